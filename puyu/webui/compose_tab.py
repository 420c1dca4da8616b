"""The composition tab (图文创作): an instruction and uploaded pictures in, the illustrated article out (rendered,
plus article.md / article.html to download). Needs the in-process engine on an InternLM-XComposer2 model."""
from __future__ import annotations

import base64
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from .chat import format_error


def _inline_images(page: str, folder: Path) -> str:
    """The article's HTML body with `images/NAME` sources turned into data: URLs (the page can show them)."""
    body = page.split("<body>", 1)[-1].rsplit("</body>", 1)[0]

    def data_url(m: re.Match) -> str:
        path = folder / "images" / Path(m.group(1)).name
        mime = "image/" + (path.suffix.lower().lstrip(".").replace("jpg", "jpeg") or "png")
        return f'src="data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"'

    return re.sub(r'src="images/([^"/]+)"', data_url, body)


def run_composition(pipe: Any, instruction: str, uploads: Optional[list], max_new_tokens: int) -> tuple:
    """(rendered HTML, [article.md, article.html], error) for one click."""
    from ..compose.compose import compose
    from ..config import GenerationConfig

    if not (instruction or "").strip():
        return "", None, format_error("write an instruction first")
    if not uploads:
        return "", None, format_error("upload at least one picture")
    work = Path(tempfile.mkdtemp(prefix="puyu-compose-"))
    pictures = work / "pictures"
    pictures.mkdir()
    for f in uploads:
        src = Path(getattr(f, "name", f))
        shutil.copyfile(src, pictures / src.name)
    try:
        result = compose(pipe, instruction, pictures, work / "article", GenerationConfig(max_new_tokens=max_new_tokens))
    except ValueError as exc:
        return "", None, format_error(str(exc))
    html = _inline_images(result.html.read_text(encoding="utf-8"), result.html.parent)
    return html, [str(result.markdown), str(result.html)], ""


def build_compose_tab(pipe: Optional[Any], max_new_tokens: int = 1024) -> None:
    """Add the tab's components; `pipe` is a `puyu.pipeline` on a vision model, or None (the tab says why not)."""
    if pipe is None:
        gr.Markdown("Composition needs the in-process engine on an InternLM-XComposer2 model "
                    "(`puyu webui internlm-xcomposer2-7b`).", elem_id="compose-unavailable")
        return
    with gr.Row():
        with gr.Column(scale=2):
            instruction = gr.Textbox(label="Instruction or outline", lines=4, elem_id="compose-instruction")
            pictures = gr.File(label="Pictures to choose from", file_count="multiple", file_types=["image"],
                               elem_id="compose-pictures")
            go = gr.Button("Compose", variant="primary", elem_id="compose-go")
            error = gr.Markdown("", elem_id="compose-error")
            files = gr.File(label="Article files", interactive=False, elem_id="compose-files")
        with gr.Column(scale=3):
            article = gr.HTML("", elem_id="compose-article")

    def on_go(text: str, uploads: Optional[list]) -> tuple:
        return run_composition(pipe, text, uploads, max_new_tokens)

    go.click(on_go, [instruction, pictures], [article, files, error], concurrency_limit=4)
