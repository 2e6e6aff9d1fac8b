"""Exceptions with messages meant for the user of the `wmse` command, and the command's exit statuses."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TrainingError", "RunStopped", "EXIT_OK", "EXIT_TRAINING_ERROR", "EXIT_USAGE", "EXIT_STOPPED",
           "EXIT_INTERRUPTED", "EXIT_WORKER_LOST"]

EXIT_OK = 0  # finished
EXIT_TRAINING_ERROR = 1  # diverged: the loss stayed non-finite, or the run ended in a non-finite state that has no
#                          checkpoint; the last finite checkpoint (if any) is kept
EXIT_USAGE = 2  # an error the user can fix: command line, config, data, files, disk
EXIT_STOPPED = 75  # stopped by SIGINT/SIGTERM after saving a checkpoint: resumable (sysexits' EX_TEMPFAIL)
EXIT_WORKER_LOST = 76  # a process of a multi-process run died (SIGKILL, out of memory, a lost machine): resumable
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, without a checkpoint of the current step


class TrainingError(RuntimeError):
    """Training diverged (the loss stayed non-finite, or the run ended in a non-finite state it cannot save);
    the message says why, which checkpoint exists, and what to try."""


class RunStopped(Exception):
    """The run was stopped by a signal after writing its checkpoint; ``wmse pretrain --resume`` continues it."""

    def __init__(self, run_dir: Path, step: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} at step {step}; the checkpoint is saved, continue with: "
                         f"wmse pretrain --resume {run_dir}")
        self.run_dir, self.step, self.signal_name = run_dir, step, signal_name
