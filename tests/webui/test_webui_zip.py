"""The web UI's run-folder download: only regular files inside the run folder go into the zip, never what a
symlink planted by the sandboxed code points at, nor a fifo that would block the reader."""
from __future__ import annotations

import os
import zipfile

from puyu.webui.analysis import zip_run


def test_zip_packs_regular_files_and_never_follows_links(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key").write_text("PRIVATE KEY")
    run = tmp_path / "runs" / "run-001"
    (run / "work" / "figures").mkdir(parents=True)
    (run / "report.md").write_text("# report")
    (run / "work" / "figures" / "fig-1.png").write_bytes(b"\x89PNG....")
    os.symlink(secret, run / "work" / "stolen.txt")           # a file link
    os.symlink("/proc/self/environ", run / "work" / "env")    # the web UI's own environment
    os.symlink(outside, run / "work" / "dirlink")              # a folder link
    os.mkfifo(run / "work" / "pipe")                           # would block a plain read
    path = zip_run(run)
    assert path == run.with_name("run-001.zip")
    with zipfile.ZipFile(path) as archive:
        names = sorted(archive.namelist())
        blob = b"".join(archive.read(n) for n in names)
    assert names == ["run-001/report.md", "run-001/work/figures/fig-1.png"], names
    assert b"SECRET" not in blob and b"PRIVATE" not in blob and b"PATH=" not in blob
    assert not path.with_name(path.name + ".part").exists()
