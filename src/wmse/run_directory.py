"""A run directory: created once, never reused by another run, written by one process at a time.

- A new run takes a directory that does not exist yet (``mkdir`` without ``exist_ok``: atomic, so two
  runs started at once cannot both take it). A name the user chose that is taken is an error; a name
  made from the time stamp gets a ``-2``, ``-3`` ... suffix instead. A directory that holds no run (only
  the ``.lock`` and empty folders a run killed while loading its data leaves) does not take the name:
  a new run reuses it once it holds the lock (a live process that holds it still refuses).
- The process that writes a run holds an exclusive ``flock`` on ``RUN/.lock`` (a new run and
  ``--resume`` alike); a second process is refused with one line. The kernel releases the lock when
  the process dies, kill -9 included, so there are no stale locks.
- Opening a run removes what a killed write left behind (``*.tmp`` files of the atomic writer) and, on
  resume, the metrics records written after the checkpoint it resumes from.
- A run that fails before it has written anything (bad data, bad config) leaves no directory behind.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from .fileio import remove_orphans, write_text_atomic
from .progress import read_jsonl

__all__ = ["RunDirectory", "LOCK_NAME"]

LOCK_NAME = ".lock"


def _taken(path: Path) -> ValueError:
    return ValueError(f"run directory {path} already exists: a new run never writes into another run's "
                      f"directory; pick another --run_name, or continue that run with "
                      f"`wmse pretrain --resume {path}`")


def _holds_no_run(path: Path) -> bool:
    """Whether ``path`` is a directory with nothing in it but lock files and empty folders (what a run killed
    before it wrote its config leaves): no file of the user's or of a run is there to lose."""
    if path.is_symlink() or not path.is_dir():
        return False
    for p in path.rglob("*"):
        if p.is_symlink() or not (p.is_dir() or p.name == LOCK_NAME):
            return False
    return True


class RunDirectory:
    """The directory of one run (see the module docstring). Use :meth:`create` or :meth:`existing`."""

    def __init__(self, path: Path, created: bool, parent_created: bool = False, reclaimed: bool = False) -> None:
        self.path = Path(path)
        self.created = created  # made by this process: removed again if the run fails before writing
        self.parent_created = parent_created  # --out_dir made for it: removed too when left empty
        self.reclaimed = reclaimed  # an existing directory that held no run, taken for a new one
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, out_dir: str | Path, name: str | None, default_stem: str) -> RunDirectory:
        """A new directory ``out_dir/name``; without a name, ``out_dir/<default_stem>-<time stamp>``."""
        parent = Path(out_dir).expanduser()
        parent_created = not parent.exists()
        parent.mkdir(parents=True, exist_ok=True)
        if name is not None:
            path = parent / name
            try:
                path.mkdir()
            except FileExistsError:
                if not _holds_no_run(path):
                    raise _taken(path) from None
                return cls(path, created=True, reclaimed=True)  # checked again under the lock
            return cls(path, created=True, parent_created=parent_created)
        stem = f"{default_stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        for i in range(1, 1000):
            path = parent / (stem if i == 1 else f"{stem}-{i}")
            try:
                path.mkdir()
                return cls(path, created=True, parent_created=parent_created)
            except FileExistsError:
                continue
        raise ValueError(f"{parent} holds 999 runs named {stem}*; pass --run_name")

    @classmethod
    def existing(cls, path: str | Path) -> RunDirectory:
        """The directory of a run to resume (``path`` is the run directory)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"run directory {path} does not exist")
        return cls(path, created=False)

    # ------------------------------------------------------------------ the lock

    def lock(self) -> None:
        """Take the run's exclusive lock, or raise ValueError naming the process that holds it."""
        lock_path = self.path / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = lock_path.read_text().strip() or "?"
            raise ValueError(f"run directory {self.path} is being written by another wmse process (pid {holder}); "
                             "wait for it to finish or stop it first") from None
        if self.reclaimed and not _holds_no_run(self.path):  # another run took it since the check
            os.close(fd)
            raise _taken(self.path)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as err:  # a full disk
            os.close(fd)
            raise OSError(err.errno, err.strerror, str(lock_path)) from err
        self._lock_fd = fd
        for folder in (self.path, self.path / "checkpoints"):
            remove_orphans(folder)

    def close(self, failed: bool = False) -> None:
        """Release the lock; with ``failed``, remove a directory this process made if it holds nothing yet."""
        if failed and self.created and not self.has_output():
            shutil.rmtree(self.path, ignore_errors=True)
            if self.parent_created:
                try:
                    self.path.parent.rmdir()  # only if empty: another run may have started there since
                except OSError:
                    pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def has_output(self) -> bool:
        """Whether anything but the lock file was written here."""
        return any(p.name != LOCK_NAME for p in self.path.iterdir()) if self.path.is_dir() else False

    # ------------------------------------------------------------------ files

    def write_config(self, config: dict, provenance: dict) -> None:
        """RUN/config.json: every resolved field, plus where they came from (preset, fields changed)."""
        write_text_atomic(self.path / "config.json", json.dumps({**config, **provenance}, indent=2))

    def truncate_metrics(self, step: int) -> int:
        """Drop the metrics records logged after ``step`` (a resume continues from a checkpoint at ``step``;
        the steps a killed run logged after it are logged again). Returns how many were dropped."""
        path = self.path / "metrics.jsonl"
        records, bad = read_jsonl(path)  # bad: lines cut by the kill
        kept = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] > step)]
        dropped = bad + len(records) - len(kept)
        if dropped:
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        return dropped
