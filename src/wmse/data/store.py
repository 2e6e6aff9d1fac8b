"""The decoded-image store: one file of raw uint8 pixels, memory-mapped by every process that trains on it.

Layout (little-endian)::

    [0, 4096)                      prefix: magic, version, data offset, data length, header length, header CRC-32
    [4096, 4096 + D)               pixels: N images of C x H x W uint8, image after image (D = N*C*H*W)
    [4096 + D, 4096 + D + L)       header: UTF-8 JSON (key, shape, labels, classes, paths, skipped, notes,
                                   the CRC-32 of every 4 MiB block of the pixels)

Writing: :func:`write_store` streams decoded chunks into a temporary file beside the store (peak memory is
the chunks in flight, never the dataset), reads the pixels back once to checksum them, and renames the file
into place (:func:`~wmse.fileio.write_atomic`): a kill or a full disk leaves no store, only the old one or
none. Before the pixels are written, the store's size is checked against the free space of its folder.

Opening: :func:`open_store` checks the prefix, the file size, the header's CRC-32 and every pixel block's
CRC-32 (read with ``pread`` a few blocks at a time by a few threads, so the check adds no resident memory), then maps the
pixels copy-on-write (``np.memmap(mode="c")``, a private mapping): processes on one machine share the page
cache's single copy, torch accepts the array without a read-only warning, and a stray in-place write would
stay private to its process instead of changing the file (a read-only mapping would kill the process with
SIGSEGV). A store that fails a check is reported in one warning and rebuilt by the caller, never trained on.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
import threading
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch
from torch import Tensor

from ..fileio import write_atomic
from .decode import Decoded, default_workers, warn_skipped

__all__ = ["Store", "StoreError", "SUFFIX", "write_store", "open_store", "read_store", "cached_store",
           "check_free_space"]

MAGIC = b"WMSESTOR"
VERSION = 1
SUFFIX = ".wstore"
DATA_OFFSET = 4096  # pixels start on a page boundary, so the mapping's offset is aligned
BLOCK = 4 << 20  # bytes per checksummed block; the check holds one such buffer per thread
_PREFIX = struct.Struct("<8sIQQQI")  # magic, version, data offset, data length, header length, header CRC-32


class StoreError(ValueError):
    """A store file that is not whole: truncated, overwritten, of another version, or for other data."""


@dataclass
class Store:
    """An opened store: ``images`` uint8 ``(N, C, H, W)`` mapped from ``path``; the rest from its header."""

    path: Path
    images: Tensor
    labels: Tensor
    classes: list[str]
    paths: list[str]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def check_free_space(folder: Path, n: int, shape: tuple[int, ...]) -> None:
    """Raise OSError (ENOSPC), one line naming the size, the folder and WMSE_CACHE, when N images of
    ``shape`` cannot fit in ``folder``'s free space."""
    need = n * int(np.prod(shape))
    free = free_bytes(folder)
    if need > free:
        raise OSError(errno.ENOSPC, f"the decoded-image store needs {_size(need)} ({n} images of "
                      f"{'x'.join(map(str, shape))}) but {folder} has {_size(free)} free; free space there "
                      "or set WMSE_CACHE to a folder with room")


class _Writer:
    """Streams decoded images into an open file at DATA_OFFSET; gray images are widened to RGB at the end
    when the set turns out mixed (as a stack of mixed images would be)."""

    def __init__(self, f: IO[bytes], folder: Path, total: int, what: str) -> None:
        self.f, self.folder, self.total, self.what = f, folder, total, what
        self.hw: tuple[int, int] | None = None
        self.channels: list[int] = []

    def add(self, a: np.ndarray) -> None:
        if self.hw is None:
            self.hw = a.shape[1:]
            check_free_space(self.folder, self.total, a.shape)
        elif a.shape[1:] != self.hw:
            raise ValueError(f"{self.what}: images have different sizes (e.g. {self.hw} and {a.shape[1:]}); "
                             "pass --resize PIXELS (resize= in Python) to resize and center-crop them to one square size")
        self.f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
        self.channels.append(a.shape[0])

    def finish(self) -> tuple[int, int, int, int]:
        """Widen gray images in place if colour ones exist (backwards: a widened image never overwrites an
        unread one); returns the shape (N, C, H, W)."""
        h, w = self.hw
        c = max(self.channels)
        if c != min(self.channels):
            ends = np.cumsum(np.asarray(self.channels, dtype=np.int64) * h * w)
            for i in range(len(self.channels) - 1, -1, -1):
                size = self.channels[i] * h * w
                self.f.seek(DATA_OFFSET + int(ends[i]) - size)
                a = np.frombuffer(self.f.read(size), np.uint8).reshape(self.channels[i], h, w)
                self.f.seek(DATA_OFFSET + i * c * h * w)
                self.f.write(np.ascontiguousarray(np.broadcast_to(a, (c, h, w))).data)
        return len(self.channels), c, h, w


def _block_crcs(f: IO[bytes], start: int, length: int, block: int = BLOCK) -> list[int]:
    """CRC-32 of each ``block`` bytes of ``f[start:start+length]``; blocks are read (``pread``) and checksummed by a
    few threads (zlib releases the GIL), so memory is a few blocks and the check uses several cores."""
    fd = f.fileno()
    local = threading.local()

    def crc(offset: int) -> int:
        size = min(block, start + length - offset)
        if not hasattr(local, "buf"):
            local.buf = memoryview(bytearray(block))
        got = os.preadv(fd, [local.buf[:size]], offset)
        if got != size:
            raise StoreError(f"pixels end {size - got} bytes early")
        return zlib.crc32(local.buf[:size])

    with ThreadPoolExecutor(max_workers=min(4, default_workers())) as pool:
        return list(pool.map(crc, range(start, start + length, block)))


def write_store(path: Path, key: str, decoded: Iterable[list[Decoded]], names: list[str], labels: list[int],
                classes: list[str], what: str, notes: Iterable[str] = (), prefix: str = "") -> None:
    """Write the store of ``names`` (paths, one per decoded source, in order) atomically.

    ``prefix`` + a name is how warnings show it (an archive's path before its member names).

    ``decoded`` yields the decoded chunks in the order of ``names`` (see ``decode.decode_stream``);
    unreadable files are left out and listed in the header (``skipped``) and in one warning.

    Raises:
        ValueError: no image could be read, or sizes differ.
        OSError: the store does not fit (ENOSPC, checked before the pixels are written) or cannot be written.
    """
    def fill(f: IO[bytes]) -> None:
        f.write(b"\0" * DATA_OFFSET)
        writer = _Writer(f, path.parent, len(names), what)
        kept, bad = [], []
        i = 0
        try:
            for chunk in decoded:
                for d in chunk:
                    if isinstance(d, str):
                        bad.append((names[i], d))
                    else:
                        writer.add(d)
                        kept.append(i)
                    i += 1
        finally:  # a failure (sizes differ) closes the decode now, not at exit when its pool's pipes are gone
            getattr(decoded, "close", lambda: None)()
        if bad:
            warn_skipped(what, [f"{prefix}{name} ({msg})" for name, msg in bad], len(names), stacklevel=4)
        if not kept:
            raise ValueError(f"{what}: none of the {len(names)} image files could be read (first: {prefix}{bad[0][0]})")
        shape = writer.finish()
        data_len = int(np.prod(shape))
        f.flush()
        header = json.dumps({
            "version": VERSION, "key": key, "shape": shape, "block": BLOCK,
            "crc32": _block_crcs(f, DATA_OFFSET, data_len, BLOCK),
            "labels": [labels[k] for k in kept], "classes": list(classes), "paths": [names[k] for k in kept],
            "skipped": [name for name, _ in bad], "notes": list(notes),
        }).encode()
        f.seek(DATA_OFFSET + data_len)
        f.write(header)
        f.truncate()
        f.seek(0)
        f.write(_PREFIX.pack(MAGIC, VERSION, DATA_OFFSET, data_len, len(header), zlib.crc32(header)))

    write_atomic(path, fill, mode=0o644)  # a shared cache should be readable by all


def _read_header(f: IO[bytes], path: Path) -> tuple[dict, int]:
    size = os.fstat(f.fileno()).st_size
    raw = f.read(_PREFIX.size)
    if len(raw) < _PREFIX.size:
        raise StoreError(f"{size} bytes, shorter than a store's prefix (truncated)")
    magic, version, offset, data_len, header_len, header_crc = _PREFIX.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise StoreError(f"not a wmse store of version {VERSION}")
    if size != offset + data_len + header_len:
        raise StoreError(f"{size} bytes where the prefix says {offset + data_len + header_len} (truncated or grown)")
    f.seek(offset + data_len)
    header = f.read(header_len)
    if zlib.crc32(header) != header_crc:
        raise StoreError("the header's CRC-32 does not match")
    meta = json.loads(header)
    n, c, h, w = meta["shape"]
    if n * c * h * w != data_len or not (len(meta["labels"]) == len(meta["paths"]) == n):
        raise StoreError("the header's shape, labels and paths disagree")
    return meta, offset


def read_store(path: Path, key: str | None = None) -> Store:
    """Open a store after checking it whole (see the module docstring). Raises StoreError or OSError."""
    path = Path(path)
    with open(path, "rb") as f:
        meta, offset = _read_header(f, path)
        if key is not None and meta["key"] != key:
            raise StoreError(f"written for other data (key {meta['key']}, expected {key})")
        n, c, h, w = meta["shape"]
        block = int(meta["block"])
        if not 0 < block <= 1 << 30 or len(meta["crc32"]) != -(-n * c * h * w // block):
            raise StoreError("the header's block checksums do not cover the pixels")
        crcs = _block_crcs(f, offset, n * c * h * w, block)
        bad = [i for i, (got, want) in enumerate(zip(crcs, meta["crc32"])) if got != want]
        if bad:
            raise StoreError(f"pixel block(s) {bad[:3]} fail their CRC-32 (the file was changed or damaged)")
    pixels = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(n, c, h, w))
    return Store(path, torch.from_numpy(pixels), torch.tensor(meta["labels"], dtype=torch.int64),
                 list(meta["classes"]), list(meta["paths"]), list(meta["skipped"]), list(meta["notes"]))


def open_store(path: Path, key: str) -> Store | None:
    """The store at ``path``, or None when absent, or when damaged (then one warning: it is rebuilt)."""
    if not path.exists():
        return None
    try:
        return read_store(path, key)
    except (StoreError, OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON
        warnings.warn(f"ignoring damaged decode cache {path} ({exc}); rebuilding it", stacklevel=3)
        return None


def _unwritable(folder: Path) -> str | None:
    """Why no store can be written in ``folder`` (None when one can)."""
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if os.access(folder, os.W_OK) else "no write permission"


def cached_store(cache_dir: Path, key: str, build: Callable[[Path], None], what: str, keep: bool = True,
                 prefix: str = "") -> Store:
    """The store ``<cache_dir>/<key>.wstore``, opened, or built by ``build(path)`` first.

    ``keep=False`` (no cache), or a folder that cannot be written (then one warning), builds an anonymous
    store (in ``cache_dir`` if writable, else the temporary folder) that is unlinked once mapped: the pixels
    still live on disk, not in memory. A hit repeats the build's warning about skipped files.
    """
    why_not = _unwritable(cache_dir)
    writable = why_not is None
    anonymous = not keep or not writable
    if keep and not writable:
        warnings.warn(f"could not write decode cache in {cache_dir} ({why_not}); using a temporary one (set "
                      "WMSE_CACHE to a writable folder to keep it)", stacklevel=3)
    if not anonymous:
        path = cache_dir / f"{key}{SUFFIX}"
        store = open_store(path, key)
        if store is not None:
            if store.skipped:
                warn_skipped(what, [prefix + s for s in store.skipped], len(store.paths) + len(store.skipped),
                             stacklevel=4)
            return store
    else:
        folder = cache_dir if writable else Path(tempfile.gettempdir())
        path = folder / f".anonymous-{uuid.uuid4().hex}{SUFFIX}"
    build(path)
    try:
        return read_store(path, key)
    finally:
        if anonymous:
            path.unlink(missing_ok=True)  # the mapping keeps the pixels until the process ends

