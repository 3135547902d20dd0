"""What the pipeline shows on the terminal: one line per stage, the final table, errors in full.

Ray, transformers, DeepSpeed and the stages themselves print hundreds of lines (worker logs,
weight-loading bars, warnings). Under ``log_to(path)`` the process's own stdout and stderr file
descriptors point at ``path`` instead, so everything, C-level output and Ray's forwarded worker
logs included, lands in the log file; ``say`` still reaches the terminal. On an error the
descriptors are restored first, so the traceback is printed on the terminal as usual.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO

_terminal: TextIO | None = None  # the real stdout while output is redirected to a log file


def say(message: str) -> None:
    """A line for the person at the terminal (also kept in the log file)."""
    if _terminal is not None:
        _terminal.write(message + "\n")
        _terminal.flush()
    print(message, flush=True)  # the terminal when not redirected; else the log, beside what it summarizes


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[Path]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` for the block."""
    global _terminal
    if _terminal is not None:  # already redirected (a nested call): one log is enough
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    log = open(path, "a", buffering=1)
    _terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # Python-level writers too: sys.stdout is not always file descriptor 1 (a notebook, a test runner).
    sys.stdout = sys.stderr = log
    try:
        yield path
    finally:
        sys.stdout, sys.stderr = saved_streams
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _terminal.close()
        _terminal = None
        log.close()


def _summary(result) -> str:
    """The few numbers worth a glance from what a pipeline stage returned."""
    if not isinstance(result, dict):
        return ""
    parts = []
    for key, label in (("n_labeled", "labeled"), ("n_unlabeled", "unlabeled"), ("rows", "pairs annotated")):
        if isinstance(result.get(key), int):
            parts.append(f"{result[key]} {label}")
    metrics = result.get("metrics", result)
    for key, fmt in (("annotator.heldout_accuracy", "held-out accuracy {:.3f}"),
                     ("annotator.mean_confidence", "mean confidence {:.3f}"),
                     # where the data carries a gold judge (the built-in benchmark): the figure that says whether
                     # the annotator is useful, which its noisy-label test cannot always show
                     ("annotator.gold_accuracy", "agreement with the gold judge {:.3f}"),
                     ("annotator_ensemble.gold_accuracy", "agreement with the gold judge {:.3f}"),
                     ("gra", "GRA {:.3f}")):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(fmt.format(metrics[key]))
    if isinstance(metrics.get("gra_lo"), (int, float)):
        parts[-1] += f" [{metrics['gra_lo']:.3f}, {metrics['gra_hi']:.3f}]"
    return ", ".join(parts)


def stage_line(name: str, status: str, seconds: float | None = None, result=None, fingerprint: str = "") -> None:
    summary = _summary(result)
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    say(f"  {name:<22} {status}{took}" + (f": {summary}" if summary else "")
        + (f" (fingerprint {fingerprint})" if fingerprint and status != "done" else ""))


@contextlib.contextmanager
def timed_stage(name: str) -> Iterator[Callable[[object], None]]:
    """``with timed_stage(name) as done: ...; done(result)`` prints the stage's line when it ends.

    On a terminal the line shows the stage running, with its seconds, rewritten in place every
    second (one line however long the stage takes); elsewhere (a job log, CI) only the final line.
    """
    start = time.perf_counter()
    stop = threading.Event()
    ticker = None
    if _terminal is not None and _terminal.isatty():
        def tick():
            while not stop.wait(1.0):
                _terminal.write(f"\r  {name:<22} running {time.perf_counter() - start:.0f} s ")
                _terminal.flush()
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()

    def stop_ticker() -> None:
        if not stop.is_set() and ticker is not None:
            stop.set()
            ticker.join()
            _terminal.write("\r\033[K")  # clear the running line; a final one may take its place
            _terminal.flush()
        stop.set()

    def done(result) -> None:
        stop_ticker()
        stage_line(name, "done", time.perf_counter() - start, result)

    try:
        yield done
    finally:
        stop_ticker()


def show_file(path: Path, skip_sections: tuple[str, ...] = (), max_line: int = 0) -> None:
    """A small Markdown file (the compare table) on the terminal, without the ``### `` sections whose
    title starts with one of ``skip_sections``; prose lines longer than ``max_line`` are left out
    (tables never are). The file itself keeps everything."""
    if not path.exists():
        return
    skipping, shown, left_out = False, [], 0
    for line in path.read_text().rstrip().splitlines():
        if line.startswith("### "):
            skipping = line[4:].startswith(skip_sections) if skip_sections else False
        if skipping or (max_line and len(line) > max_line and not line.startswith("|")):
            left_out += 1
            continue
        shown.append(line)
    for line in shown:
        say(line)
    if left_out:
        say(f"(the whole comparison, every judge included: {path})")
