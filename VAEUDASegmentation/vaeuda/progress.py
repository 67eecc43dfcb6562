"""Progress for long work: a tqdm bar with ETA on a terminal, JSON lines for Slicer.

JSON mode writes one object per line to stdout, flushed, for example::

    {"event": "stage", "stage": "adapt", "total": 300}
    {"event": "progress", "stage": "adapt", "step": 240, "total": 300, "fraction": 0.8, "eta_s": 31.0, "loss": 1.23}
    {"event": "log", "message": "..."}
    {"event": "table", "markdown": "| ... |"}          (evaluate only: its result table)
    {"event": "done", "outputs": ["/path/model.safetensors"]}
    {"event": "error", "message": "one sentence"}
    {"event": "interrupted", "message": "interrupted; ...", "checkpoint": "/path/model.safetensors.ckpt"}   (Ctrl-C)

Training's progress events also carry ``seg`` and ``task``; a non-finite value is written as
null. The Slicer module reads these keys and ignores others (Docs/engine-contract.md).
"""
from __future__ import annotations

import errno
import json
import math
import sys
import time
from typing import Optional

from . import fileio

MODES = ("auto", "tty", "json", "none")


STDOUT_NAME = "the standard output"


def write_stdout(text: str) -> None:
    """Write ``text`` and a newline to stdout, flushed. A refusal other than a closed pipe (a full
    disk, ``> /dev/full``) names the standard output, as a refused file names its path."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise                               # the reader went away: the command line stops as on SIGPIPE
    except OSError as exc:
        if fileio.WINDOWS and exc.errno == errno.EINVAL:     # Windows' word for a reader that has gone
            raise BrokenPipeError(errno.EPIPE, "the reader of the standard output has gone") from exc
        raise OSError(exc.errno, exc.strerror, STDOUT_NAME) from exc


def emit(event: str, **fields) -> None:
    """Write one JSON progress line to stdout (used in JSON mode, and for the final events).
    A non-finite number is written as null: NaN and Infinity are not JSON."""
    fields = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}
    write_stdout(json.dumps({"event": event, **fields}, allow_nan=False))


def listed(names, shown: int = 3) -> str:
    """``a, b, c``, or ``a, b, c and 4 more``: the first ``shown`` names of a list a log line reports."""
    names = [str(n) for n in names]
    rest = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {rest} more" if rest > 0 else "")


class Reporter:
    """Reports the stages and steps of one command in the chosen mode ("tty", "json" or "none").

    "none" shows no progress; log lines (which preset was chosen, a resume, an early stop) still
    go to stderr, as they do beside a bar. "auto" is "tty" on a terminal, else "none".
    """

    def __init__(self, mode: str = "auto"):
        if mode == "auto":
            mode = "tty" if sys.stderr.isatty() else "none"
        self.mode = mode
        self._bar = None
        self._stage = ""
        self._total = 0
        self._start = 0
        self._t0 = 0.0
        self._last_emit = 0.0

    def stage(self, name: str, total: int, start: int = 0) -> None:
        """Start a stage of ``total`` steps (closes the previous one); ``start`` steps were done
        before this process (a resumed run), so the rate and ETA count only the steps after them."""
        self.close()
        self._stage, self._total, self._start, self._t0 = name, int(total), int(start), time.monotonic()
        self._last_emit = 0.0
        if self.mode == "json":
            emit("stage", stage=name, total=int(total))
        elif self.mode == "tty":
            from tqdm import tqdm
            self._bar = tqdm(total=int(total), initial=int(start), desc=name, file=sys.stderr, dynamic_ncols=True)

    def step(self, step: int, force: bool = False, **metrics) -> None:
        """Steps done so far in this stage (1-based), with optional scalar metrics to show."""
        if self.mode == "tty" and self._bar is not None:
            self._bar.n = step
            if metrics:
                self._bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()}, refresh=False)
            self._bar.refresh()
        elif self.mode == "json":
            now = time.monotonic()
            if not force and step < self._total and now - self._last_emit < 0.5:
                return
            self._last_emit = now
            elapsed = now - self._t0
            frac = step / self._total if self._total else 1.0
            done_here = step - self._start
            eta = elapsed * (self._total - step) / done_here if done_here > 0 else None
            emit("progress", stage=self._stage, step=int(step), total=self._total,
                 fraction=round(frac, 4), eta_s=None if eta is None else round(eta, 1),
                 **{k: float(v) for k, v in metrics.items()})

    def log(self, message: str) -> None:
        """A line for the user: stderr on a terminal, a JSON log event in JSON mode."""
        if self.mode == "json":
            emit("log", message=message)
        elif self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


_NULL: Optional[Reporter] = None


def null_reporter() -> Reporter:
    """A reporter for library calls: no progress, log lines on stderr (mode "none")."""
    global _NULL
    if _NULL is None:
        _NULL = Reporter("none")
    return _NULL
