"""Atomic file writes: a reader (or a crash) never sees half a file.

Everything wmse writes that another process may read, or that must survive a kill mid-write
(checkpoints, decoded-image caches, exported features, config.json), goes through here: the bytes go
to a temporary file in the same folder, are flushed to disk, and the file is renamed over the target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomic", "save_atomic", "write_text_atomic", "TMP_SUFFIX", "remove_orphans"]

TMP_SUFFIX = ".tmp"


class _Recording:
    """A binary file whose first failed write is kept: some writers (torch.save's zip writer) turn the
    OSError of a full disk into a RuntimeError without the cause."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any], mode: int | None = None) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    ``mode``: file permissions to set (temporary files are created 0600; a shared cache wants 0644).
    On any error (a full disk, a kill) the temporary file is removed and ``path`` is left as it was; a
    failed write raises its OSError with ``filename`` set to ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as raw:  # readable too: a writer may read back what it wrote (store checksums)
            f = _Recording(raw)
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            except Exception as err:
                cause = f.error or (err if isinstance(err, OSError) else None)
                if cause is None:
                    raise
                raise OSError(cause.errno, cause.strerror, str(path)) from err
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_atomic(obj: Any, path: str | Path, mode: int | None = None) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f), mode)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``NAME.*.tmp``) a process killed in the middle of a write left in ``folder``.

    Only call it where no other process can be writing (a run directory under its lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f"*.*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
