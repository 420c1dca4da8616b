"""Layout of the image Q&A tab (浦语·灵笔2: upload a picture, ask, streamed answers, multi-turn) and its wiring to
`image_chat.py`."""
from __future__ import annotations

from typing import Any, AsyncIterator

import gradio as gr

from . import image_chat
from .backends import ChatBackend
from .chat_tab import CONCURRENCY
from .image_chat import ImageConversation
from .settings import ChatSettings

READY = "picture ready: ask about it"


def build_image_tab(backend: ChatBackend, settings: ChatSettings) -> None:
    """Add the image tab's components to the current `gr.Blocks` (inside a `gr.Tab`); replies use `settings`."""
    conv_state = gr.State(ImageConversation())
    gr.Markdown("Ask a vision model (InternLM-XComposer2-VL) about a picture. A new picture starts a new "
                "conversation.", elem_id="vqa-help")
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(type="pil", label="Picture", sources=["upload"], elem_id="vqa-image", height=360)
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(value=[], elem_id="vqa-history", label="Answers", height=360,
                                 feedback_options=None)
            question = gr.Textbox(placeholder="Ask about the picture and press Enter", show_label=False, lines=1,
                                  max_lines=6, elem_id="vqa-input")
            with gr.Row():
                send_btn = gr.Button("Ask", variant="primary", elem_id="vqa-send")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="vqa-stop")
                clear_btn = gr.Button("Clear", elem_id="vqa-clear")
            status = gr.Markdown("", elem_id="vqa-status")
            error = gr.Markdown("", elem_id="vqa-error")

    async def on_ask(text: str, picture: Any, conv: ImageConversation) -> AsyncIterator[tuple]:
        if picture is not None and not conv.image_url:  # asked before the upload's own event was handled
            conv = image_chat.new_conversation(picture)
        async for update in image_chat.ask(backend, text, conv, settings):
            yield update

    def on_image(picture: Any) -> tuple:
        conv = image_chat.new_conversation(picture)
        return conv.display(), conv, READY if picture is not None else "", ""

    outputs = [chatbot, conv_state, status, error]
    ask_event = gr.on([question.submit, send_btn.click], on_ask, [question, image, conv_state], outputs + [question],
                      concurrency_limit=CONCURRENCY, trigger_mode="once")
    stop_btn.click(None, None, None, cancels=[ask_event])
    image.change(on_image, [image], outputs, cancels=[ask_event])
    clear_btn.click(on_image, [image], outputs, cancels=[ask_event])
