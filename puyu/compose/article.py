"""The article step: the prompt that asks for an article with image slots, and the slots found in the reply.

A slot is a marker `<image: a short caption>` anywhere in the text; the model writes it where a picture belongs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SLOT = re.compile(r"<image:\s*([^<>\n]{1,200}?)\s*>")
COMPOSE_PROMPT = ("Write an article in Markdown for the instruction below. Where a picture belongs, write a marker "
                  "<image: a short caption of the picture> on its own line; use a few of them.\n\nInstruction: ")
CAPTION_PROMPT = "Describe this picture in one short sentence."


@dataclass(frozen=True)
class Slot:
    start: int  # character span of the marker in the article
    end: int
    caption: str


def article_messages(instruction: str) -> list[dict]:
    return [{"role": "user", "content": COMPOSE_PROMPT + instruction.strip()}]


def find_slots(text: str) -> list[Slot]:
    return [Slot(m.start(), m.end(), m.group(1).strip()) for m in SLOT.finditer(text)]
