"""Layout of the data-analysis tab: upload files, ask, watch the agent's steps, download the run folder."""
from __future__ import annotations

from typing import AsyncIterator, Optional

import gradio as gr

from .analysis import AnalysisService, AnalysisSession, follow_run, zip_run
from .chat import format_error
from .steps import render_event, render_partial, run_summary

CONCURRENCY = 8


def build_analysis_tab(service: AnalysisService) -> None:
    """Add the tab's components to the current `gr.Blocks` (inside a `gr.Tab`)."""
    session_state = gr.State(None)  # an AnalysisSession, made on the session's first run
    gr.Markdown(f"Agent model: {service.description}. Each question is one run with a fresh sandboxed Python "
                "interpreter (no network) working on copies of the uploaded files.", elem_id="analysis-backend")
    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(file_count="multiple", label="Files (CSV, Excel, JSON, text ...)",
                            elem_id="analysis-files")
            question = gr.Textbox(label="Question", lines=1, max_lines=6, elem_id="analysis-question",
                                  placeholder="e.g. Plot the monthly sales and tell me which month was best")
            with gr.Row():
                run_btn = gr.Button("Run analysis", variant="primary", elem_id="analysis-run")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="analysis-stop")
            status = gr.Markdown("", elem_id="analysis-status")
            error = gr.Markdown("", elem_id="analysis-error")
            download = gr.DownloadButton("Download run folder (.zip)", visible=False, elem_id="analysis-download")
        with gr.Column(scale=2):
            steps = gr.Chatbot(label="Agent steps", elem_id="analysis-steps", height=640, feedback_options=None,
                               buttons=["copy", "copy_all"])

    async def on_run(paths: Optional[list[str]], text: str,
                     session: Optional[AnalysisSession]) -> AsyncIterator[tuple]:
        hidden = gr.DownloadButton(visible=False)
        text = (text or "").strip()
        if not text:
            yield gr.skip(), session, "", format_error("question: type a question first"), hidden
            return
        session = session or AnalysisSession()
        if session.current is not None:
            yield gr.skip(), session, gr.skip(), format_error("a run is in progress: wait for it or stop it"), \
                gr.skip()
            return
        messages: list[dict] = []
        summary, problem = "running…", ""
        yield messages, session, summary, problem, hidden
        partial: list[dict] = []
        run_dir = service.new_run_dir(session)
        async for event in follow_run(service, session, run_dir, text, list(paths or [])):
            if event["event"] == "partial":
                partial = render_partial(event["text"])
            elif event["event"] == "run_end":
                summary = run_summary(event)
            elif event["event"] == "ui_error":
                summary, problem = "failed", format_error(event["message"])
            if event["event"] != "partial":
                messages = messages + render_event(event, run_dir)
            yield messages + partial, session, summary, problem, hidden
        if (run_dir / "transcript.jsonl").exists():
            yield messages, session, summary, problem, gr.DownloadButton(value=str(zip_run(run_dir)), visible=True)

    def on_stop(session: Optional[AnalysisSession]) -> str:
        if session is None or not session.stop():
            return format_error("no run in progress")
        return ""

    outputs = [steps, session_state, status, error, download]
    stop_btn.click(on_stop, [session_state], [error])
    gr.on([run_btn.click, question.submit], on_run, [files, question, session_state], outputs,
          concurrency_limit=CONCURRENCY, trigger_mode="once")
