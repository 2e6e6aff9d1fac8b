"""Image folders: list, decode in parallel once, and cache the decoded uint8 tensor.

The cache key is a hash of the folder path, the file list with sizes and mtimes, the resize
setting and a format version, so a changed folder (file added, removed, rewritten) rebuilds it.
A cache file holds ``{"images": uint8 (N, C, H, W), "keep": bool (n_files,)}``; labels and paths are
re-derived from the listing, which the key already pins.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..fileio import save_atomic
from .dataset import cache_root

__all__ = ["IMAGE_EXTENSIONS", "Listing", "list_folder", "decode_files", "decode_chunks", "stack_decoded",
           "load_listing"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_CACHE_VERSION = "wmse-decode-v1"
_MAX_SHOWN = 5
_CHUNK = 256  # files per decode task


@dataclass
class Listing:
    """Files to decode, with their labels (-1 when unlabeled) and class names."""

    files: list[str]
    labels: list[int]
    classes: list[str]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[str]:
    """All image files below ``folder`` (recursive, sorted, hidden entries skipped)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def list_folder(folder: str | Path) -> Listing:
    """List an ImageFolder tree (class subfolders) or a flat folder of unlabeled images.

    Class subfolders that hold no image are ignored; loose images next to class folders are
    ignored with a warning (as torchvision's ImageFolder does, silently).

    Raises:
        FileNotFoundError: the folder does not exist or holds no image file.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (or is not a directory); "
                                "pass --data_dir PATH (root= in Python) to an image folder or archive")
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.path for e in entries if e.is_file() and _is_image(e.name)]
    files: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for sub in subdirs:
        found = _images_under(Path(sub.path))
        if found:
            labels.extend([len(classes)] * len(found))
            classes.append(sub.name)
            files.extend(found)
    if classes:
        if loose:
            warnings.warn(f"{folder}: {len(loose)} image(s) next to the class folders are ignored "
                          f"(first: {loose[0]})", stacklevel=3)
        return Listing(files, labels, classes)
    if not loose:
        raise FileNotFoundError(f"image folder {folder} holds no image file ({', '.join(IMAGE_EXTENSIONS)}) "
                                "directly or in class subfolders")
    return Listing(loose, [-1] * len(loose), [])


def _cache_key(folder: Path, files: list[str], resize: int | None) -> str:
    """Hash of everything that changes the decoded result (path, names, sizes, mtimes, resize)."""
    digest = hashlib.sha256()
    digest.update(f"{_CACHE_VERSION}\0{folder.resolve()}\0{resize}\0".encode())
    for path in files:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _decode_one(src: str | bytes, resize: int | None) -> np.ndarray:
    """Decode one file (a path, or the bytes of an archive member) to uint8 (H, W) for grayscale or
    (H, W, 3); optional square resize.

    ``resize=r`` resizes the shorter side to r (bicubic, antialiased by PIL) and center-crops r x r,
    so a folder of mixed sizes stacks into one tensor.
    """
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
        if resize is not None and img.format == "JPEG":
            # DCT-domain downscaling: decodes big JPEGs several times faster, never below `resize`.
            img.draft(img.mode, (resize, resize))
        img = img.convert("L") if img.mode in ("L", "I;16", "I", "1") else img.convert("RGB")
        if resize is not None:
            # torchvision's Resize(resize) + CenterCrop(resize) sizes and offsets.
            w, h = img.size
            nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = int(round((nw - resize) / 2.0)), int(round((nh - resize) / 2.0))
            img = img.crop((left, top, left + resize, top + resize))
        return np.asarray(img)


Source = Union[str, bytes, BaseException]  # a path, a member's bytes, or the error reading that member


def _decode_chunk(sources: list[Source], resize: int | None) -> list[np.ndarray | str]:
    """Decode a chunk; an unreadable file yields its error message (str) instead of an array."""
    out: list[np.ndarray | str] = []
    for src in sources:
        try:
            if isinstance(src, BaseException):
                raise src
            out.append(_decode_one(src, resize))
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def decode_chunks(chunks: Iterable[list[Source]], total: int, resize: int | None = None,
                  workers: int | None = None, what: str = "images") -> list[np.ndarray | str]:
    """Decode chunks of sources in parallel threads (PIL releases the GIL while decoding), in order.

    ``chunks`` may be a generator that reads the sources (archive members) in the calling thread:
    at most ``2 * workers`` chunks are in flight, so only their bytes are held at once.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    decoded: list[np.ndarray | str] = []
    pending: deque = deque()
    start = last = time.monotonic()

    def collect() -> None:
        nonlocal last
        decoded.extend(pending.popleft().result())
        now = time.monotonic()
        if now - last > 5.0:  # progress on long decodes only
            print(f"wmse: decoding {what}: {len(decoded)}/{total} ({now - start:.0f} s)", file=sys.stderr)
            last = now

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in chunks:
            pending.append(pool.submit(_decode_chunk, chunk, resize))
            while len(pending) >= 2 * workers:
                collect()
        while pending:
            collect()
    return decoded


def _warn_skipped(what: str, bad: list[str], total: int, stacklevel: int = 3) -> None:
    """The one warning for unreadable images (``bad``: "path" or "path (error)"), at decode and on cache hits."""
    warnings.warn(f"{what}: skipped {len(bad)} unreadable image file(s) of {total}: " + "; ".join(bad[:_MAX_SHOWN])
                  + (" ..." if len(bad) > _MAX_SHOWN else ""), stacklevel=stacklevel)


def stack_decoded(files: list[str], decoded: list[np.ndarray | str], what: str = "images") -> tuple[Tensor, Tensor]:
    """Stack decoded arrays (errors as str, one per file) into uint8 ``(M, C, H, W)`` plus ``keep`` (bool)."""
    keep = torch.tensor([not isinstance(d, str) for d in decoded], dtype=torch.bool)
    bad = [(f, d) for f, d in zip(files, decoded) if isinstance(d, str)]
    arrays = [d for d in decoded if not isinstance(d, str)]
    if bad:
        _warn_skipped(what, [f"{f} ({msg})" for f, msg in bad], len(files))
    if not arrays:
        raise ValueError(f"{what}: none of the {len(files)} image files could be read (first: {bad[0][0]})")
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{what}: images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
                         "pass --resize PIXELS (resize= in Python) to resize and center-crop them to one square size")
    gray = all(a.ndim == 2 for a in arrays)
    # Mixed grayscale / colour folders become RGB by replicating the gray channel.
    stacked = np.stack([a if gray else (a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2))
                        for a in arrays])
    images = torch.from_numpy(stacked)
    images = images.unsqueeze(1) if gray else images.permute(0, 3, 1, 2)
    return images.contiguous(), keep


def decode_files(files: list[str], resize: int | None = None, workers: int | None = None,
                 what: str = "images") -> tuple[Tensor, Tensor]:
    """Decode files in parallel threads (PIL releases the GIL while decoding).

    Returns:
        images: uint8 ``(M, C, H, W)`` of the M readable files (C = 1 when every image is grayscale).
        keep: bool ``(len(files),)``, True where a file was decoded.
    Raises:
        ValueError: no file was readable, or sizes differ and ``resize`` is None.
    """
    chunks = (files[i:i + _CHUNK] for i in range(0, len(files), _CHUNK))
    return stack_decoded(files, decode_chunks(chunks, len(files), resize, workers, what), what)


def read_cache(cache_file: Path | None) -> dict | None:
    """The blob of a decode cache file, or None when absent or unreadable (then warn: it is rebuilt)."""
    if cache_file is None or not cache_file.exists():
        return None
    try:
        return torch.load(cache_file, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: rebuild it
        warnings.warn(f"ignoring unreadable cache {cache_file}: {exc}", stacklevel=3)
        return None


def write_cache(blob: dict, cache_file: Path | None) -> None:
    """Write a decode cache file atomically, world-readable; a read-only location only warns."""
    if cache_file is None:
        return
    try:
        save_atomic(blob, cache_file, mode=0o644)  # a shared cache should be readable by all
    except OSError as exc:  # read-only location: the caller still returns the data
        warnings.warn(f"could not write decode cache {cache_file}: {exc}; set WMSE_CACHE to a writable "
                      "directory", stacklevel=3)


def check_resize(resize: int | None) -> None:
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise ValueError(f"resize={resize!r} must be a positive int (pixels) or None")


def load_listing(folder: Path, listing: Listing, resize: int | None = None, cache: bool = True,
                 what: str = "images") -> tuple[Tensor, Tensor, list[str]]:
    """Decode the files of a listing, through the cache when possible.

    Returns:
        images: uint8 ``(M, C, H, W)``; labels: int64 ``(M,)``; paths: the M decoded files.
    """
    check_resize(resize)
    cache_file = None
    if cache:
        cache_file = cache_root() / f"{_cache_key(folder, listing.files, resize)}.pt"
    images = keep = None
    blob = read_cache(cache_file)
    if blob is not None:
        try:
            images, keep = blob["images"], blob["keep"]
            if keep.numel() != len(listing.files) or int(keep.sum()) != images.shape[0]:
                images = keep = None  # inconsistent file (should not happen): rebuild
        except (KeyError, TypeError, AttributeError):
            images = keep = None
    if images is None:
        images, keep = decode_files(listing.files, resize, what=what)
        write_cache({"images": images, "keep": keep}, cache_file)
    elif not bool(keep.all()):
        # Cache hit: repeat the decode-time warning so a reload still reports the skipped files.
        _warn_skipped(what, [f for f, k in zip(listing.files, keep.tolist()) if not k], len(listing.files))
    kept = keep.nonzero().flatten().tolist()
    labels = torch.tensor([listing.labels[i] for i in kept], dtype=torch.int64)
    paths = [listing.files[i] for i in kept]
    return images, labels, paths
