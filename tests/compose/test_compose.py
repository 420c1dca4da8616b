"""`puyu compose` (图文创作): slots in the model's article, filled from a local folder by the model's own captions,
exported as Markdown and HTML. End to end on a scripted tiny XComposer2 checkpoint (greedy decoding follows a fixed
reply through the real engine); the matching and the export on given texts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from puyu.cli import main
from puyu.compose.article import find_slots
from puyu.compose.export import filled_markdown, write_article
from puyu.compose.matching import assign, similarity
from puyu.testing import random_png, scripted_copy

REPLY = "Sun<image: red square>End<|im_end|>"


@pytest.fixture(scope="module")
def scripted(xcomposer2_checkpoint, tmp_path_factory):
    return scripted_copy(xcomposer2_checkpoint, tmp_path_factory.mktemp("scripted-xc2") / "model", REPLY)


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "pictures"
    d.mkdir()
    random_png(d / "a.png", 1)
    random_png(d / "b.png", 2)
    (d / "notes.txt").write_text("not an image: skipped by suffix")
    return d


def test_compose_end_to_end(scripted, folder, tmp_path):
    out = tmp_path / "article"
    rc = main(["compose", str(scripted), "Write about the sun", "--images", str(folder), "--out", str(out),
               "--dtype", "float32", "--cache-max-entry-count", "64", "--max-new-tokens", "40"])
    assert rc == 0
    md = (out / "article.md").read_text()
    assert md == "Sun![red square](images/a.png)End"  # the model's slot, filled (captions tie: the first by name)
    assert (out / "images" / "a.png").read_bytes() == (folder / "a.png").read_bytes()
    assert not (out / "images" / "b.png").exists()
    page = (out / "article.html").read_text()
    assert '<img src="images/a.png" alt="red square"' in page and "<title>Write about the sun</title>" in page


def test_slots_and_matching_by_caption():
    text = "Intro.\n<image: a blue circle>\nMiddle <image:red square on white> and <image: a green tree>."
    slots = find_slots(text)
    assert [s.caption for s in slots] == ["a blue circle", "red square on white", "a green tree"]
    captions = {Path("a.png"): "A red square on a white background.", Path("b.png"): "A blue circle."}
    assert similarity("红色的方块", "一个红色方块") > similarity("红色的方块", "蓝色圆") > 0
    chosen = assign(slots, captions)
    assert chosen == [Path("b.png"), Path("a.png"), None]  # the third slot: images ran out
    md = filled_markdown(text, slots, chosen)
    assert md == ("Intro.\n![a blue circle](images/b.png)\nMiddle ![red square on white](images/a.png) and "
                  "*a green tree*.")


def test_model_markup_is_escaped_in_html(tmp_path):
    text = "# Title\n<script>alert(1)</script> <image: x [1]>"
    slots = find_slots(text)
    _, page = write_article(tmp_path / "o", text, slots, [None], title="<b>t</b>")
    html = page.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "<title>&lt;b&gt;t&lt;/b&gt;</title>" in html
    assert "<h1>Title</h1>" in html and "<em>x (1)</em>" in html


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puyu.cli", "compose", *args], capture_output=True, text=True,
                          timeout=300)


def test_compose_errors_are_one_line(internlm2_checkpoint, xcomposer2_checkpoint, folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = _cli(str(xcomposer2_checkpoint), "x", "--images", str(empty), "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and bad.stderr.strip() == f"puyu: error: {empty}: no images " \
        "(.png, .jpg, .jpeg, .webp, .bmp, .gif) in the folder"
    (folder / "c.png").write_text("broken")
    broken = _cli(str(xcomposer2_checkpoint), "x", "--images", str(folder), "--out", str(tmp_path / "o"),
                  "--cache-max-entry-count", "32")
    assert broken.returncode == 2 and "c.png" in broken.stderr and "not an image" in broken.stderr
    (folder / "c.png").unlink()
    text_only = _cli(str(internlm2_checkpoint), "x", "--images", str(folder), "--out", str(tmp_path / "o"),
                     "--cache-max-entry-count", "32")
    assert text_only.returncode == 2 and "has no vision" in text_only.stderr and "Traceback" not in text_only.stderr
