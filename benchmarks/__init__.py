"""Benchmarks behind `mlamoe bench --suite ...` (timings, not tests)."""
from __future__ import annotations

import os
import sys
import time


def time_blocks(run: dict, repeats: int, warmup: int, rounds: int = 4) -> dict[str, list[float]]:
    """{form: [ms, ...]} for the callables in `run`: each form's calls in a block (after `warmup`
    untimed calls), the blocks repeated `rounds` times in alternating order so that slow drift of the
    machine's load spreads over all forms. Not run by run interleaved: on a 2-core machine the previous
    ORT session's worker threads are still spinning when the next session starts and slow it by
    milliseconds (figures: docs/benchmarks.md)."""
    times: dict[str, list[float]] = {form: [] for form in run}
    per_block = max(1, -(-repeats // rounds))
    order = list(run)
    for r in range(rounds):
        for form in (order if r % 2 == 0 else order[::-1]):
            for _ in range(warmup):
                run[form]()
            for _ in range(per_block):
                t = time.perf_counter()
                run[form]()
                times[form].append((time.perf_counter() - t) * 1e3)
    return times


def command_line(module: str, argv=None) -> str:
    """The command that produced a result, as stored in its JSON (PYTHONPATH included when set)."""
    pythonpath = os.environ.get("PYTHONPATH")
    args = argv if argv is not None else sys.argv[1:]
    return (f"PYTHONPATH={pythonpath} " if pythonpath else "") + f"python3 -m {module} " + " ".join(args)


def elapsed_logger():
    """log(msg) printing the seconds since this call before each message (long device runs)."""
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)
    return log
