"""The data-analysis tab in headless chromium: a real agent run (runner, protocol, sandboxed interpreter, run
folder) driven by the agent's recorded model, since a tiny random model writes no useful code."""
from __future__ import annotations

import contextlib
import threading
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import expect

from webui_testlib import DOCS, running_app, upload

pytest.importorskip("lagent", reason="the data-analysis tab needs the agent extra (puyu[agent])")

from puyu.agent.replay import ReplayModel  # noqa: E402
from puyu.webui.analysis import AnalysisService  # noqa: E402
from puyu.webui.app import AppConfig  # noqa: E402
from puyu.webui.backends import ChatChunk  # noqa: E402

CALL = "<|action_start|><|interpreter|>\n```python\n{code}\n```<|action_end|>\n"
FIRST = """import glob
import pandas as pd
path = sorted(glob.glob('*.csv'))[0]
df = pd.read_csv(path)
print(df['revenue'].sum())"""
SECOND = """import glob
import pandas as pd
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
print('state from an earlier run:', 'marker' in globals())
marker = True
path = sorted(glob.glob('*.csv'))[0]
df = pd.read_csv(path)
print('file:', path)
print('total sales:', df['sales'].sum())
df.plot(x='month', y='sales', title='sales per month')
plt.show()"""
REPLIES = [
    "Let me load the file and add up the revenue." + CALL.format(code=FIRST),
    "There is no revenue column; the column is called sales. I will sum it and plot it." + CALL.format(code=SECOND),
    "The total is printed above, and the figure shows the sales per month.",
]


class PausingReplay(ReplayModel):
    """The recorded model, which can pause inside its first reply (after the thought, in the middle of the code)
    until the test has seen that much in the page."""

    pause: "threading.Event | None" = None
    paused = threading.Event()

    def _stream(self, prompt, params):
        sent = 0
        for chunk in super()._stream(prompt, params):
            yield chunk
            sent += len(chunk)
            if self.pause is not None and len(self.prompts) == 1 and sent >= REPLIES[0].index("read_csv"):
                PausingReplay.paused.set()
                self.pause.wait(60)
                PausingReplay.pause = None


class NoChat:
    """The chat tab is not under test here; this backend says so if it is used."""

    description = "none"

    async def stream(self, messages, settings):
        yield ChatChunk("", "stop")

    def close(self) -> None:
        pass


def write_csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("month,sales\n" + "".join(f"{m},{s}\n" for m, s in rows))
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    runs = tmp_path_factory.mktemp("webui-runs")
    service = AnalysisService(lambda: PausingReplay(list(REPLIES)), runs, description="replay")
    with running_app(NoChat(), AppConfig(analysis=service)) as url:
        yield url, runs


def run_analysis_in(page, csv: Path, question: str) -> None:
    upload(page, csv)
    page.locator("#analysis-question textarea").fill(question)
    page.locator("#analysis-run").click()


def steps(page):
    return page.locator("#analysis-steps")


@contextlib.contextmanager
def paused_in_first_reply(page, csv: Path, question: str) -> Iterator[None]:
    """Start a run whose model pauses in the middle of its first reply; it goes on when the block ends."""
    release = threading.Event()
    PausingReplay.paused.clear()
    PausingReplay.pause = release
    try:
        run_analysis_in(page, csv, question)
        assert PausingReplay.paused.wait(60), "the model never started"
        yield
    finally:
        release.set()


def test_upload_csv_shows_steps_figure_and_download(app, page_factory, tmp_path):
    url, runs = app
    page = page_factory(url)
    csv = write_csv(tmp_path / "shop.csv", [("Jan", 10), ("Feb", 25), ("Mar", 7)])
    run_analysis_in(page, csv, "What are the total sales? Plot them per month.")
    expect(page.locator("#analysis-status")).to_contain_text("answered")
    # thoughts, both code cells, the error of the first, the output of the second, the answer
    expect(steps(page)).to_contain_text("no revenue column")
    expect(steps(page)).to_contain_text("KeyError")
    expect(steps(page)).to_contain_text("total sales: 42")
    expect(steps(page)).to_contain_text("file: shop.csv")
    expect(steps(page)).to_contain_text("the figure shows the sales per month")
    for title in ("Thought", "Code · cell 1", "Error · cell 1", "Code · cell 2", "Output · cell 2"):
        expect(steps(page)).to_contain_text(title)
    # the figure the sandbox saved is shown inline, loaded from the server
    figure = steps(page).locator("img[src*='figure-']")
    expect(figure).to_have_count(1)
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=figure.element_handle())
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "webui-analysis.png"), full_page=True)
    # the run folder comes down as a zip holding the transcript, the report, the figure and the input copy
    with page.expect_download() as info:
        page.locator("#analysis-download").click()
    archive = tmp_path / "run.zip"
    info.value.save_as(archive)
    names = zipfile.ZipFile(archive).namelist()
    assert {"run-001/transcript.jsonl", "run-001/report.md", "run-001/result.json",
            "run-001/work/shop.csv"} <= set(names)
    assert any(n.startswith("run-001/figures/") and n.endswith(".png") for n in names)


def test_two_sessions_have_separate_files_runs_and_interpreters(app, page_factory, tmp_path):
    url, runs = app
    page_a, page_b = page_factory(url), page_factory(url)
    csv_a = write_csv(tmp_path / "alpha.csv", [("Jan", 1), ("Feb", 2)])
    (tmp_path / "b").mkdir()
    csv_b = write_csv(tmp_path / "b" / "beta.csv", [("Jan", 100), ("Feb", 200), ("Mar", 300)])
    run_analysis_in(page_a, csv_a, "Total sales?")
    run_analysis_in(page_b, csv_b, "Total sales?")
    for page in (page_a, page_b):
        expect(page.locator("#analysis-status")).to_contain_text("answered")
        expect(steps(page)).to_contain_text("state from an earlier run: False")
    expect(steps(page_a)).to_contain_text("total sales: 3")
    expect(steps(page_a)).not_to_contain_text("beta.csv")
    expect(steps(page_b)).to_contain_text("total sales: 600")
    expect(steps(page_b)).not_to_contain_text("alpha.csv")
    # a second question in session A runs with a fresh interpreter, in A's own folder
    page_a.locator("#analysis-question textarea").fill("And again?")
    page_a.locator("#analysis-run").click()
    expect(steps(page_a)).to_contain_text("And again?")  # the new run has replaced the old steps
    expect(page_a.locator("#analysis-status")).to_contain_text("answered")
    expect(steps(page_a)).to_contain_text("state from an earlier run: False")
    expect(steps(page_a)).to_contain_text("total sales: 3")
    # on disk: one folder per session, one run folder per question, each with only its session's file
    folders = {}
    for csv in runs.glob("*/run-*/work/*.csv"):
        run = csv.parent.parent
        folders.setdefault(run.parent.name, set()).add((run.name, csv.name))
    by_file = {name: session for session, items in folders.items() for _, name in items}
    assert folders[by_file["alpha.csv"]] == {("run-001", "alpha.csv"), ("run-002", "alpha.csv")}
    assert folders[by_file["beta.csv"]] == {("run-001", "beta.csv")}


def test_a_model_turn_shows_while_it_streams(app, page_factory, tmp_path):
    url, _ = app
    page = page_factory(url)
    with paused_in_first_reply(page, write_csv(tmp_path / "live.csv", [("Jan", 5)]), "Total?"):
        expect(steps(page)).to_contain_text("Thinking")
        expect(steps(page)).to_contain_text("Let me load the file")
        expect(steps(page)).to_contain_text("glob.glob")  # the code as far as it is written
        expect(page.locator("#analysis-status")).to_contain_text("running")
    expect(page.locator("#analysis-status")).to_contain_text("answered")
    expect(steps(page)).not_to_contain_text("Thinking")
    expect(steps(page)).to_contain_text("total sales: 5")


def test_stop_ends_the_run_cleanly(app, page_factory, tmp_path):
    url, _ = app
    page = page_factory(url)
    with paused_in_first_reply(page, write_csv(tmp_path / "stop.csv", [("Jan", 5)]), "Total?"):
        expect(steps(page)).to_contain_text("Thinking")
        page.locator("#analysis-stop").click()
        expect(page.locator("#analysis-error")).to_have_text("")
    # the model is cut off before its first call ran: no cell, a model error that says why, a run folder to take
    expect(page.locator("#analysis-status")).to_contain_text("model_error")
    expect(page.locator("#analysis-status")).to_contain_text("stopped by the user")
    expect(steps(page)).not_to_contain_text("Code · cell")
    expect(page.locator("#analysis-download")).to_be_visible()
    page.locator("#analysis-stop").click()
    expect(page.locator("#analysis-error")).to_contain_text("no run in progress")
