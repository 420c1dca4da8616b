"""The composition workflow on a vision engine: write the article, caption the folder's images, fill the slots."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import GenerationConfig
from .article import CAPTION_PROMPT, Slot, article_messages, find_slots
from .export import write_article
from .matching import assign, image_files


@dataclass
class Composition:
    text: str  # the model's article, slots as written
    slots: list[Slot]
    captions: dict[Path, str]  # image -> the model's caption of it
    chosen: list[Optional[Path]]  # per slot
    markdown: Path
    html: Path


def compose(pipe: Any, instruction: str, image_dir: Path, out_dir: Path,
            gen_config: Optional[GenerationConfig] = None, caption_tokens: int = 48) -> Composition:
    """`pipe`: a `puyu.pipeline` on a vision model. The images are checked before anything is generated."""
    from ..engine.multimodal import load_image

    if not getattr(getattr(pipe.engine, "spec", None), "vision", ""):
        raise ValueError(f"model {pipe.engine.model_name} has no vision: composition needs InternLM-XComposer2")
    files = image_files(image_dir)
    images = [load_image(p, str(p)) for p in files]
    text = pipe(article_messages(instruction), gen_config or GenerationConfig(max_new_tokens=1024)).text
    slots = find_slots(text)
    captions: dict[Path, str] = {}
    if slots:  # one batch: the engine captions every image at once
        replies = pipe([(CAPTION_PROMPT, im) for im in images], GenerationConfig(max_new_tokens=caption_tokens))
        captions = {p: r.text.strip() for p, r in zip(files, replies)}
    chosen = assign(slots, captions)
    md, html = write_article(out_dir, text, slots, chosen, title=instruction.strip()[:80])
    return Composition(text, slots, captions, chosen, md, html)
