"""Progress of long work on a terminal, silence in logs.

On a terminal (stderr is a TTY and $CI is unset) a stage shows one status line rewritten in place: what it
is doing, a count where there is one ("golden case 2/3"), and the seconds it has run, refreshed every
second while a step is silent (an export traces for minutes). Elsewhere (CI logs, pipes, files) nothing is
written here: the stage runner's "[stage] running ..." / "done in N s" lines are all a log gets.
`MLAMOE_PROGRESS=1` / `0` forces it on / off.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time


def live_default(stream) -> bool:
    forced = os.environ.get("MLAMOE_PROGRESS")
    if forced is not None:
        return forced not in ("", "0")
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


class Progress:
    def __init__(self, stream=None, live: bool | None = None, interval: float = 1.0):
        self.stream = stream or sys.stderr
        self.live = live_default(self.stream) if live is None else live
        self.interval = interval
        self._stage: str | None = None
        self._what = ""
        self._start = 0.0
        self._lock = threading.Lock()
        self._width = 0

    def _draw(self) -> None:
        if not self.live or self._stage is None:
            return
        text = f"[{self._stage}] {self._what} ({time.perf_counter() - self._start:.0f} s)"
        with self._lock:
            self.stream.write("\r" + text.ljust(self._width))
            self.stream.flush()
            self._width = len(text)

    def update(self, what: str, done: int | None = None, total: int | None = None) -> None:
        """What the current stage is doing now (with a count: `what done/total`)."""
        self._what = f"{what} {done}/{total}" if done is not None and total is not None else what
        self._draw()

    def clear(self) -> None:
        if self.live and self._width:
            with self._lock:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
                self._width = 0

    @contextlib.contextmanager
    def stage(self, name: str, what: str = "running"):
        """The status line of one stage while it runs; refreshed every `interval` seconds on a terminal."""
        self._stage, self._what, self._start = name, what, time.perf_counter()
        stop = threading.Event()
        ticker = None
        if self.live:
            def tick():
                while not stop.wait(self.interval):
                    self._draw()
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
            self._draw()
        try:
            yield self
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            self.clear()
            self._stage = None


QUIET = Progress(live=False)
