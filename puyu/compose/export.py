"""Writing the composed article: `article.md` (slots replaced by images in `images/`) and `article.html`.

The HTML is rendered with markdown-it with raw HTML off, so nothing the model writes becomes markup of its own.
"""
from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Optional

from .article import Slot

HTML_PAGE = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
             "<style>body{{max-width:46em;margin:2em auto;font-family:sans-serif;line-height:1.6}}"
             "img{{max-width:100%}}</style></head>\n<body>\n{body}</body></html>\n")


def _alt(caption: str) -> str:
    return caption.replace("[", "(").replace("]", ")")


def filled_markdown(text: str, slots: list[Slot], chosen: list[Optional[Path]]) -> str:
    """The article with each slot replaced by `![caption](images/NAME)`, or its caption in italics without one."""
    out, pos = [], 0
    for slot, image in zip(slots, chosen):
        out.append(text[pos:slot.start])
        out.append(f"![{_alt(slot.caption)}](images/{image.name})" if image else f"*{_alt(slot.caption)}*")
        pos = slot.end
    out.append(text[pos:])
    return "".join(out)


def write_article(out_dir: Path, text: str, slots: list[Slot], chosen: list[Optional[Path]],
                  title: str) -> tuple[Path, Path]:
    """Write article.md, article.html and the chosen images under `out_dir`; returns the two paths."""
    from markdown_it import MarkdownIt

    out_dir.mkdir(parents=True, exist_ok=True)
    images = out_dir / "images"
    images.mkdir(exist_ok=True)
    for image in {c for c in chosen if c is not None}:
        shutil.copyfile(image, images / image.name)
    markdown = filled_markdown(text, slots, chosen)
    md_path, html_path = out_dir / "article.md", out_dir / "article.html"
    md_path.write_text(markdown, encoding="utf-8")
    body = MarkdownIt("commonmark", {"html": False}).render(markdown)
    html_path.write_text(HTML_PAGE.format(title=html.escape(title), body=body), encoding="utf-8")
    return md_path, html_path
