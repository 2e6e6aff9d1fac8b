"""Atomic file writes: a reader (or a crash) never sees half a file.

Everything wmse writes that another process may read, or that must survive a kill mid-write
(checkpoints, decoded-image caches, exported features, config.json), goes through here: the bytes go
to a temporary file in the same folder, are flushed to disk, and the file is renamed over the target.
A set of files that belong together (an embed) is written as a folder aside and swapped in at once
(:func:`write_folder_atomic`).

Every temporary (``NAME.*.tmp`` file, ``.NAME.*.tmp`` folder) is ``flock``-ed by its writer while it
exists, so :func:`remove_orphans` removes only those of writers that died (the kernel drops the lock
of a dead process) and never one being written, whichever process runs it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomic", "save_atomic", "write_text_atomic", "write_folder_atomic", "check_replaceable",
           "TMP_SUFFIX", "remove_orphans", "error_naming"]

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
    fd, tmp = _locked_temp(lambda: tempfile.mkstemp(prefix=f"{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        with _naming_errors(path), os.fdopen(fd, "w+b") as raw:  # open (so locked) until renamed; readable: a store reads back its checksums
            _write_synced(raw, write, path)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def error_naming(err: OSError, path: str | Path) -> OSError:
    """``err`` itself when it names a file, else the same error naming ``path`` (so its message says where)."""
    return err if err.filename else OSError(err.errno, err.strerror or str(err), str(path))


@contextmanager
def _naming_errors(path: Path):
    """OSErrors that name no file (closing a buffered file flushes it again, and fails again) name ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename:
            raise
        raise error_naming(err, path) from err


def _write_synced(raw: IO[bytes], write: Callable[[IO[bytes]], Any], path: Path) -> None:
    """``write(raw)``, flush and fsync; a failed write raises its OSError with ``filename`` set to ``path``."""
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


def _locked_temp(make: Callable[[], tuple[int, str]]) -> tuple[int, str]:
    """A new temporary (``make()`` -> (descriptor, path)) with an exclusive flock held on the descriptor.

    A cleaner that took the lock between ``make`` and ``flock`` has removed the temporary (its link count
    is then 0): make another.
    """
    while True:
        fd, path = make()
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return fd, path
        os.close(fd)


def save_atomic(obj: Any, path: str | Path, mode: int | None = None) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f), mode)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def remove_orphans(folder: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete the temporaries (``NAME.*.tmp`` files, ``.NAME.*.tmp`` folders) that writers which died in the
    middle of a write (a kill, a crash) left in ``folder``; those being written are kept (their writer holds
    a flock on them). Safe to call from any process at any time. ``names``: only the temporaries of these
    targets (in a folder that is the user's, not wmse's)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    patterns = [f"{n}.*{TMP_SUFFIX}" for n in names] if names is not None else [f"*.*{TMP_SUFFIX}"]
    for p in (p for pattern in patterns for p in folder.glob(pattern)):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, a link, or unreadable: not ours to remove
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer holds it
        try:  # removed while locked, so a writer that made it just now sees a link count of 0 and retries
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


# ---------------------------------------------------------------------------------------------- file sets

_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h): swap two paths atomically
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(folder: str | Path, owned: tuple[str, ...]) -> None:
    """Make ``folder``'s parent, remove dead writers' temporaries there, and check that ``folder`` is absent or
    holds only files named in ``owned`` (anything else is the user's: ValueError). Early in a command, it
    fails before the work; :func:`write_folder_atomic` checks again."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder.parent, names=(f".{folder.name}",))  # the parent may be the user's: only ours
    if not folder.exists():
        return
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(folder))
    ours = [*owned, *(f"{n}.*{TMP_SUFFIX}" for n in owned)]
    foreign = sorted(p.name for p in folder.iterdir() if not any(fnmatch.fnmatchcase(p.name, o) for o in ours))
    if foreign:
        raise ValueError(f"{folder} holds files that are not wmse's ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): it is replaced as a whole, so give a "
                         "new or empty folder")
    remove_orphans(folder, names=owned)


def write_folder_atomic(folder: str | Path, files: dict[str, Callable[[IO[bytes]], Any]],
                        owned: tuple[str, ...] = ()) -> dict[str, Path]:
    """Write the files ``{name: write}`` as the folder ``folder``: they appear together or not at all.

    They are written into a locked temporary folder beside ``folder`` and fsynced; then that folder is
    swapped with ``folder`` in one rename (Linux ``RENAME_EXCHANGE``; elsewhere two renames) and the
    previous content is removed. A failure or a kill at any point leaves the previous folder whole.
    ``folder`` may already hold only files named in ``files`` or ``owned`` (an earlier set of the same
    kind): anything else is the user's and is refused (ValueError), never deleted.
    Returns ``{name: final path}``.
    """
    folder = Path(folder)
    check_replaceable(folder, (*files, *owned))
    fd, tmp = _locked_temp(lambda: _open_dir(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=TMP_SUFFIX,
                                                              dir=folder.parent)))
    tmp = Path(tmp)
    try:
        for name, write in files.items():
            with _naming_errors(folder / name), open(tmp / name, "wb") as raw:
                _write_synced(raw, write, folder / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the folder is the user's output
        _fsync_dir(tmp)
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # this write's folder, or after the swap the previous one
        os.close(fd)
    return {name: folder / name for name in files}


def _open_dir(path: str) -> tuple[int, str]:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY), path


def _swap_in(new: Path, folder: Path) -> None:
    """Put the folder ``new`` at ``folder``; afterwards ``new`` holds the previous content (or nothing)."""
    try:
        os.rename(new, folder)  # no folder there yet (or an empty one): one rename
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if not _exchange(new, folder):
            old = new.with_name(new.name[:-len(TMP_SUFFIX)] + ".old")  # not a temporary: kept by cleaners
            os.rename(folder, old)  # a kill between these two renames leaves the previous set whole in `old`
            os.rename(new, folder)
            os.rename(old, new)
    _fsync_dir(folder.parent)
