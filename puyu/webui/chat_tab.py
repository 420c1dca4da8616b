"""Layout of the chat tab and the wiring of its events to `chat.py`'s handlers."""
from __future__ import annotations

import copy
from typing import Any, AsyncIterator, cast

import gradio as gr

from . import chat
from .backends import ChatBackend
from .chat import Conversation, format_error
from ..personas import Persona, language_note, order_for_model
from .settings import ChatSettings

# Events that stream from the backend run concurrently across sessions (the engine batches them).
CONCURRENCY = 16


def _with_system(conv: Conversation, system: str) -> Conversation:
    conv = copy.deepcopy(conv)
    conv.system = system or ""
    return conv


# Asked in the browser before a persona switch wipes a conversation the user has written in (nothing to lose: no
# question). Returns the dropdown's value and whether to go on.
CONFIRM_SWITCH_JS = """(name, _) => {
  const asked = document.querySelectorAll('#chat-history [data-testid="user"]').length > 0;
  return [name, !asked || window.confirm('Switch to ' + name + '? This clears the conversation.')];
}"""
STOPPED = "stopped: the partial reply is kept"


def persona_choices(personas: list[Persona], notes: dict[str, str]) -> list[tuple[str, str]]:
    """(label, value) pairs: a persona the model may not speak is still offered, marked."""
    return [(f"{p.name} ⚠ (language)" if notes.get(p.name) else p.name, p.name) for p in personas]


def build_chat_tab(backend: ChatBackend, personas: list[Persona], defaults: ChatSettings) -> None:
    """Add the chat tab's components to the current `gr.Blocks` (inside a `gr.Tab`). A new session starts with the
    first persona that suits the model (`order_for_model`)."""
    personas = order_for_model(personas, getattr(backend, "model_id", ""))
    tokenizer = getattr(backend, "tokenizer", None)
    notes = {p.name: language_note(p, tokenizer) for p in personas}
    by_name = {p.name: p for p in personas}
    first = Conversation.start(personas[0])
    conv_state = gr.State(first)
    gr.Markdown(f"Backend: {backend.description}", elem_id="chat-backend")
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(value=cast(Any, first.display()), elem_id="chat-history", label="Chat", height=480,
                                 feedback_options=None, buttons=["copy", "copy_all"])
            message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, lines=1, max_lines=8,
                                 elem_id="chat-input")
            with gr.Row():
                send_btn = gr.Button("Send", variant="primary", elem_id="chat-send")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                regen_btn = gr.Button("Regenerate", elem_id="chat-regenerate")
                clear_btn = gr.Button("Clear", elem_id="chat-clear")
            status = gr.Markdown("", elem_id="chat-status")
            error = gr.Markdown("", elem_id="chat-error")
        with gr.Column(scale=1):
            persona = gr.Dropdown(persona_choices(personas, notes), value=personas[0].name, label="Persona",
                                  elem_id="chat-persona")
            persona_note = gr.Markdown(notes[personas[0].name], elem_id="chat-persona-note")
            go_on = gr.Checkbox(value=True, visible=False)  # set by CONFIRM_SWITCH_JS
            system = gr.Textbox(value=personas[0].system, label="System prompt", lines=4, elem_id="chat-system")
            with gr.Accordion("Generation settings", open=True):
                sliders = [
                    gr.Slider(1, 4096, value=defaults.max_new_tokens, step=1, label="Max new tokens",
                              elem_id="chat-max-tokens"),
                    gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0: greedy)",
                              elem_id="chat-temperature"),
                    gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label="Top-p", elem_id="chat-top-p"),
                    gr.Slider(0, 100, value=defaults.top_k, step=1, label="Top-k (0: off)", elem_id="chat-top-k"),
                    gr.Slider(0.5, 2.0, value=defaults.repetition_penalty, step=0.01, label="Repetition penalty",
                              elem_id="chat-repetition-penalty"),
                ]

    async def on_send(text: str, conv: Conversation, sys_prompt: str, *values: Any) -> AsyncIterator[tuple]:
        try:
            settings = ChatSettings.from_ui(*values)
        except ValueError as exc:
            yield conv.display(), conv, "", format_error(str(exc)), text
            return
        async for update in chat.send(backend, text, _with_system(conv, sys_prompt), settings):
            yield update

    async def on_regenerate(conv: Conversation, sys_prompt: str, *values: Any) -> AsyncIterator[tuple]:
        try:
            settings = ChatSettings.from_ui(*values)
        except ValueError as exc:
            yield conv.display(), conv, "", format_error(str(exc))
            return
        async for update in chat.regenerate(backend, _with_system(conv, sys_prompt), settings):
            yield update

    def on_persona(name: str, confirmed: bool, conv: Conversation) -> tuple:
        if not confirmed:  # the user kept the conversation: the dropdown goes back
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), conv.persona, gr.skip()
        picked = by_name.get(name)
        if picked is None:
            return gr.skip(), gr.skip(), gr.skip(), "", format_error(f"unknown persona {name!r}"), gr.skip(), \
                gr.skip()
        fresh = Conversation.start(picked)
        return fresh.display(), fresh, picked.system, "", "", gr.skip(), notes.get(name, "")

    def on_clear(conv: Conversation, sys_prompt: str) -> tuple:
        fresh = Conversation.start(by_name.get(conv.persona, personas[0]), sys_prompt)
        return fresh.display(), fresh, "", ""

    outputs = [chatbot, conv_state, status, error]
    send_inputs = [message, conv_state, system, *sliders]
    # one listener for Enter and the button, so a second send while a reply streams is ignored ("once")
    send_events = [gr.on([message.submit, send_btn.click], on_send, send_inputs, outputs + [message],
                         concurrency_limit=CONCURRENCY, trigger_mode="once")]
    regen_event = regen_btn.click(on_regenerate, [conv_state, system, *sliders], outputs,
                                  concurrency_limit=CONCURRENCY)
    # the status says so once the cancel is through (a streaming event leaves its last 'generating…' behind)
    stop_btn.click(None, None, None, cancels=[*send_events, regen_event]).then(lambda: STOPPED, None, [status])
    # `input`, not `change`: setting the dropdown back after a refused switch must not trigger it again
    persona.input(on_persona, [persona, go_on, conv_state],
                  [chatbot, conv_state, system, status, error, persona, persona_note],
                  cancels=[*send_events, regen_event], js=CONFIRM_SWITCH_JS)
    clear_btn.click(on_clear, [conv_state, system], outputs, cancels=[*send_events, regen_event])
    chatbot.clear(on_clear, [conv_state, system], outputs)
