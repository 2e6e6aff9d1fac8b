"""`wmse pretrain --nproc K`: K processes on this machine under torchrun's elastic agent, run in this process.

Equivalent to ``torchrun --standalone --nproc_per_node K [--max_restarts N] -m wmse pretrain ...`` without the
launcher's flags, and it stops and reports as one process does:

- **Signals.** SIGINT / SIGTERM to this process (Ctrl-C, ``kill``, a scheduler's notice) reach every worker
  exactly once: the agent forwards them to each worker's own session and waits up to
  :data:`SHUTDOWN_SECONDS` while the workers write their checkpoint; nothing is left running.
- **Statuses.** Each worker reports its exit status and its one-line message into a folder this process
  reads (:data:`STATUS_DIR_ENV`), instead of printing it; the group's status is the most severe one
  (:func:`group_outcome`), printed once. A worker that dies without reporting (SIGKILL, the out-of-memory
  killer) makes the group's status :data:`~wmse.errors.EXIT_WORKER_LOST`.
- **Noise.** torch's elastic logs are not shown, gloo's C++ warnings neither (``TORCH_CPP_LOG_LEVEL``).

For several machines call torchrun yourself (see the README's cluster section).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import uuid
from contextlib import contextmanager

from .config import Config
from .distributed import check_batch
from .errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_TRAINING_ERROR, EXIT_USAGE, EXIT_WORKER_LOST)

__all__ = ["launch", "strip_launcher_args", "group_outcome", "report", "is_lost_peer", "STATUS_DIR_ENV",
           "SHUTDOWN_SECONDS"]

STATUS_DIR_ENV = "WMSE_STATUS_DIR"
# How long the workers may take, after a signal, to finish their step and write the checkpoint before they are
# killed: torch's default (30 s) is short for a large model's checkpoint on a network file system.
SHUTDOWN_SECONDS = 300
_LAUNCHER_FLAGS = ("--nproc", "--max_restarts")
# Most severe first: the status the group reports when its workers' statuses differ.
_SEVERITY = (EXIT_WORKER_LOST, EXIT_USAGE, EXIT_TRAINING_ERROR, EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_OK)


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove ``--nproc K`` / ``--max_restarts N`` (and their ``=`` forms): the workers do not launch again."""
    out: list[str] = []
    skip = False
    for tok in argv:
        if skip:
            skip = False
        elif tok in _LAUNCHER_FLAGS:
            skip = True
        elif not tok.startswith(tuple(f"{f}=" for f in _LAUNCHER_FLAGS)):
            out.append(tok)
    return out


def _launch_config(nproc: int, max_restarts: int):
    """torchrun --standalone --nproc_per_node nproc --max_restarts max_restarts, as a LaunchConfig."""
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                        monitor_interval=0.1, shutdown_timeout=SHUTDOWN_SECONDS)


@contextmanager
def _worker_environment(status_dir: str):
    """The variables the workers inherit (the agent copies os.environ), and this process's signal handlers and
    torch's elastic logs as they were, restored afterwards."""
    saved_env = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    elastic_log = logging.getLogger("torch.distributed.elastic")
    propagate = elastic_log.propagate
    null = logging.NullHandler()
    os.environ[STATUS_DIR_ENV] = status_dir
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # --threads sets the loop's threads; torchrun would warn
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # gloo's warnings when a peer is lost
    elastic_log.propagate = False  # the agent's warnings and ChildFailedError summaries: reported here instead
    elastic_log.addHandler(null)
    try:
        yield
    finally:
        elastic_log.removeHandler(null)
        elastic_log.propagate = propagate
        os.environ.clear()
        os.environ.update(saved_env)
        for s, h in handlers.items():
            signal.signal(s, h)


def launch(nproc: int, argv: list[str], cfg: Config, max_restarts: int = 0, run_hint: str | None = None) -> int:
    """Run ``wmse <argv>`` in ``nproc`` processes under torchrun's agent; print the group's one line; return
    its exit status.

    Args:
        nproc: processes on this machine (one per GPU on CUDA; on CPU each takes ``--threads`` cores).
        argv: the command line after ``wmse`` (``pretrain ... --nproc K``); the launcher's flags are dropped.
        cfg: the config that command line gives (checked here once, not once per process).
        max_restarts: times the agent restarts the group after a worker failed (the command must find its
            checkpoint: ``--auto_resume`` or ``--resume``).
        run_hint: how to continue the run, for the message of a lost worker.

    Raises:
        ValueError: ``nproc`` < 1, or the batch cannot be split over ``nproc`` processes.
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    check_batch(cfg, nproc)
    exitcodes: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="wmse-status-") as status_dir:
        with _worker_environment(status_dir):
            try:
                elastic_launch(_launch_config(nproc, max_restarts), sys.executable)(
                    "-m", "wmse", *strip_launcher_args(argv))
            except ChildFailedError as err:
                exitcodes = {rank: f.exitcode for rank, f in err.failures.items()}
            except SignalException:
                pass  # forwarded to the workers, which reported how they stopped
        status, line = group_outcome(read_reports(status_dir), exitcodes, nproc, run_hint)
    if line:
        print(line, file=sys.stderr)
    return status


def report(status: int, line: str | None) -> bool:
    """In a worker of :func:`launch`: leave this rank's status and line for the launcher (True), else False."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder or "RANK" not in os.environ or not os.path.isdir(folder):
        return False
    from .fileio import write_text_atomic

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    name = f"attempt{attempt:04d}-rank{int(os.environ['RANK']):05d}.json"
    write_text_atomic(os.path.join(folder, name), json.dumps({"status": status, "line": line}))
    return True


def read_reports(folder: str) -> dict[int, tuple[int, str | None]]:
    """{rank: (status, line)} of the last attempt (restart) whose workers reported."""
    found: dict[int, dict[int, tuple[int, str | None]]] = {}
    for name in os.listdir(folder):
        match = re.fullmatch(r"attempt(\d+)-rank(\d+)\.json", name)
        if match:
            attempt, rank = int(match[1]), int(match[2])
            with open(os.path.join(folder, name)) as f:
                rec = json.load(f)
            found.setdefault(attempt, {})[rank] = (rec["status"], rec["line"])
    return found[max(found)] if found else {}


def group_outcome(reports: dict[int, tuple[int, str | None]], exitcodes: dict[int, int], nproc: int,
                  run_hint: str | None = None) -> tuple[int, str | None]:
    """The group's (status, line): a worker that died without reporting first, then the most severe status.

    Args:
        reports: {rank: (status, line)} the workers left.
        exitcodes: {rank: exit code} of the workers that failed (negative: killed by that signal), when known.
        nproc: the group's size (a rank that did not report is lost).
    """
    lost = sorted(set(range(nproc)) - set(reports))  # every worker that returns from `wmse` reports
    if lost:
        rank = lost[0]
        code = exitcodes.get(rank)
        how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 and
               -code in signal.Signals._value2member_map_ else
               f"exited with status {code} without a message" if code is not None else "ended without reporting")
        hint = run_hint or "wmse pretrain --resume RUN"
        return EXIT_WORKER_LOST, (f"wmse pretrain: process rank {rank} of the run {how} (the out-of-memory killer? "
                                  f"a lost machine?); the last checkpoint is kept; continue with: {hint}")
    status, line = min(((s, ln) for _, (s, ln) in sorted(reports.items())),
                       key=lambda sl: _SEVERITY.index(sl[0]) if sl[0] in _SEVERITY else 0)
    return status, line


def is_lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another process of the group is gone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(err, RuntimeError):
        return False
    try:
        from torch.distributed import DistError
    except ImportError:  # torch built without distributed support
        return False
    text = str(err)
    return isinstance(err, DistError) or "gloo" in text or "Connection reset by peer" in text
