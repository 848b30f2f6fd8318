"""Progress for long work: a live status line on a terminal, nothing in a log (pipeline/progress.py)."""
from __future__ import annotations

import io
import time

from pipeline.progress import Progress, live_default


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_status_line_rewritten_in_place_with_counts_and_seconds(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("MLAMOE_PROGRESS", raising=False)
    out = FakeTTY()
    p = Progress(out, interval=0.05)
    assert p.live
    with p.stage("export", "tracing the prefill graph"):
        time.sleep(0.2)  # silent work: the ticker redraws with the seconds
        p.update("golden case", 2, 3)
    text = out.getvalue()
    assert text.count("\r[export] tracing the prefill graph (") >= 2
    assert "[export] golden case 2/3 (" in text
    assert text.endswith("\r")  # cleared when the stage ends, so the runner's "done" line starts clean


def test_a_log_gets_nothing(monkeypatch):
    monkeypatch.delenv("MLAMOE_PROGRESS", raising=False)
    out = io.StringIO()  # not a terminal
    p = Progress(out, interval=0.01)
    with p.stage("export"):
        time.sleep(0.05)
        p.update("golden case", 1, 3)
    assert out.getvalue() == ""


def test_ci_and_the_environment_switch(monkeypatch):
    monkeypatch.delenv("MLAMOE_PROGRESS", raising=False)
    monkeypatch.setenv("CI", "true")
    assert not live_default(FakeTTY())
    monkeypatch.setenv("MLAMOE_PROGRESS", "1")
    assert live_default(io.StringIO())
    monkeypatch.setenv("MLAMOE_PROGRESS", "0")
    assert not live_default(FakeTTY())


def test_a_compile_into_a_log_writes_only_the_stage_lines(tmp_path, stage_cache, capfd, monkeypatch):
    """The stage runner's own lines and no carriage returns, when stderr is not a terminal (as in CI)."""
    monkeypatch.delenv("MLAMOE_PROGRESS", raising=False)
    from pipeline.compile import compile_package
    compile_package("tiny", "ort-cpu", tmp_path / "p", cache_dir=stage_cache, genai="none")
    err = capfd.readouterr().err
    assert "[export] " in err and "\r" not in err
