"""Progress output on stderr and metrics files (JSONL + TensorBoard) in the run directory."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from .fileio import error_naming


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "--:--"
    s = int(s)
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    """One status line: epoch, step, loss, lr, img/s and ETA.

    On a terminal the line is redrawn in place; elsewhere (CI, log files) it is printed every
    ``every`` seconds so logs stay short.
    """

    def __init__(self, total_steps: int, stream: TextIO | None = None, every: float = 10.0) -> None:
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = 0.2 if self.tty else every
        self.last_print = 0.0
        self.t0 = time.perf_counter()
        self.first_step: int | None = None
        self.closed = False

    def update(self, step: int, epoch: int, epochs: int, loss: float, lr: float, img_per_s: float, force: bool = False) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.t0 = step, now
        if not force and now - self.last_print < self.every:
            return
        self.last_print = now
        done = step - self.first_step
        rate = done / (now - self.t0) if now > self.t0 and done > 0 else float("nan")
        eta = (self.total - step) / rate if rate and rate > 0 else float("nan")
        line = (f"epoch {epoch + 1}/{epochs} step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{img_per_s:,.0f} img/s ETA {format_seconds(eta)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the redrawn line (once; closing again does nothing)."""
        if self.tty and not self.closed:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl and mirrors scalars to TensorBoard (RUN/tb)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None,
                 mirrors: list | None = None) -> None:
        """``purge_step``: on resume, the first step after the checkpoint; TensorBoard hides the events a
        killed run wrote from there on (metrics.jsonl is truncated by the run directory itself).
        ``mirrors``: objects with ``write(record)`` and ``close()`` that get every record too (wmse.loggers)."""
        self.mirrors = list(mirrors or [])
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tb"
        self.file = self.path.open("a")
        self.tb = None
        self.failed = False  # a write failed (and raised): closing stays quiet about the same fault
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                _quiet_tensorboard_thread()
                self.tb = SummaryWriter(str(self.tb_dir), purge_step=purge_step)
            except ImportError:  # tensorboard is a dependency, but a stripped install should still train
                print("note: tensorboard not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, kind: str, step: int, **values: Any) -> None:
        """One record; a failed write (a full disk) raises OSError naming the file (or the tb folder)."""
        record = {"kind": kind, "step": step, **values}
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            self.failed = True
            raise error_naming(err, self.path) from err
        for mirror in self.mirrors:
            mirror.write(record)
        if self.tb is not None:
            try:
                for key, value in values.items():
                    if isinstance(value, (int, float)) and key not in ("epoch",):
                        self.tb.add_scalar(f"{kind}/{key}", value, step)
            except OSError as err:  # the writer thread's failure, raised again by the next write
                self.failed = True
                raise error_naming(err, self.tb_dir) from err

    def close(self) -> None:
        if self.file.closed:
            return
        for close, where in ((self.file.close, self.path), (self.tb.close if self.tb else None, self.tb_dir)):
            try:
                if close is not None:
                    close()  # flushes what is left: a full disk fails here too
            except OSError as err:
                if not self.failed:
                    print(f"note: metrics not all written to {where}: {err.strerror or err}", file=sys.stderr)
                self.failed = True
        for mirror in self.mirrors:
            mirror.close()


_quiet = False


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes events in a thread; when that write fails (a full disk) the thread prints a traceback
    and the next ``add_scalar`` raises the same error. Keep the traceback off stderr: the error is reported
    once, as one line naming the folder, by :meth:`MetricsLog.write`."""
    global _quiet
    if _quiet:
        return
    previous = threading.excepthook

    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    threading.excepthook, _quiet = hook, True


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """Records of a JSON-lines file and the number of unreadable lines (a run killed while writing
    leaves a truncated last line; readers still get the rest). A missing file has no records."""
    path = Path(path)
    records, bad = [], 0
    if not path.is_file():
        return records, bad
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All readable records of RUN/metrics.jsonl (an empty list when there is none)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")[0]
