"""Image folders: list, decode in parallel once, and cache the decoded uint8 tensor.

The cache key is a hash of the folder path, the file list with sizes and mtimes, the resize
setting and a format version, so a changed folder (file added, removed, rewritten) rebuilds it.
A cache file holds ``{"images": uint8 (N, C, H, W), "keep": bool (n_files,)}``; labels and paths are
re-derived from the listing, which the key already pins.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .dataset import cache_root

__all__ = ["IMAGE_EXTENSIONS", "Listing", "list_folder", "decode_files", "load_listing"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_CACHE_VERSION = "wmse-decode-v1"
_MAX_SHOWN = 5


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
        raise FileNotFoundError(f"image folder {folder} does not exist (or is not a directory); pass root=<folder>")
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


def _decode_one(path: str, resize: int | None) -> np.ndarray:
    """Decode one file to uint8 (H, W) for grayscale or (H, W, 3); optional square resize.

    ``resize=r`` resizes the shorter side to r (bicubic, antialiased by PIL) and center-crops r x r,
    so a folder of mixed sizes stacks into one tensor.
    """
    with Image.open(path) as img:
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


def _decode_chunk(paths: list[str], resize: int | None) -> list[np.ndarray | str]:
    """Decode a chunk; an unreadable file yields its error message (str) instead of an array."""
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(_decode_one(path, resize))
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def decode_files(files: list[str], resize: int | None = None, workers: int | None = None,
                 what: str = "images") -> tuple[Tensor, Tensor]:
    """Decode files in parallel threads (PIL releases the GIL while decoding).

    Returns:
        images: uint8 ``(M, C, H, W)`` of the M readable files (C = 1 when every image is grayscale).
        keep: bool ``(len(files),)``, True where a file was decoded.
    Raises:
        ValueError: no file was readable, or sizes differ and ``resize`` is None.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    chunk = 256
    chunks = [files[i:i + chunk] for i in range(0, len(files), chunk)]
    decoded: list[np.ndarray | str] = []
    start = last = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(lambda c: _decode_chunk(c, resize), chunks):
            decoded.extend(part)
            now = time.monotonic()
            if now - last > 5.0:  # progress on long decodes only
                print(f"wmse: decoding {what}: {len(decoded)}/{len(files)} ({now - start:.0f} s)", file=sys.stderr)
                last = now
    keep = torch.tensor([not isinstance(d, str) for d in decoded], dtype=torch.bool)
    bad = [(f, d) for f, d in zip(files, decoded) if isinstance(d, str)]
    arrays = [d for d in decoded if not isinstance(d, str)]
    if bad:
        shown = "; ".join(f"{f} ({msg})" for f, msg in bad[:_MAX_SHOWN])
        warnings.warn(f"{what}: skipped {len(bad)} unreadable image file(s) of {len(files)}: {shown}"
                      + (" ..." if len(bad) > _MAX_SHOWN else ""), stacklevel=2)
    if not arrays:
        raise ValueError(f"{what}: none of the {len(files)} image files could be read (first: {bad[0][0]})")
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{what}: images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
                         "pass resize=<pixels> to resize and center-crop them to one square size")
    gray = all(a.ndim == 2 for a in arrays)
    # Mixed grayscale / colour folders become RGB by replicating the gray channel.
    stacked = np.stack([a if gray else (a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2))
                        for a in arrays])
    images = torch.from_numpy(stacked)
    images = images.unsqueeze(1) if gray else images.permute(0, 3, 1, 2)
    return images.contiguous(), keep


def _save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_listing(folder: Path, listing: Listing, resize: int | None = None, cache: bool = True,
                 what: str = "images") -> tuple[Tensor, Tensor, list[str]]:
    """Decode the files of a listing, through the cache when possible.

    Returns:
        images: uint8 ``(M, C, H, W)``; labels: int64 ``(M,)``; paths: the M decoded files.
    """
    if resize is not None and (not isinstance(resize, int) or resize < 1):
        raise ValueError(f"resize={resize!r} must be a positive int (pixels) or None")
    cache_file = None
    if cache:
        cache_file = cache_root() / f"{_cache_key(folder, listing.files, resize)}.pt"
    images = keep = None
    if cache_file is not None and cache_file.exists():
        try:
            blob = torch.load(cache_file, weights_only=True)
            images, keep = blob["images"], blob["keep"]
            if keep.numel() != len(listing.files) or int(keep.sum()) != images.shape[0]:
                images = keep = None  # inconsistent file (should not happen): rebuild
        except Exception as exc:  # a truncated or foreign file: rebuild it
            warnings.warn(f"ignoring unreadable cache {cache_file}: {exc}", stacklevel=2)
            images = keep = None
    if images is None:
        images, keep = decode_files(listing.files, resize, what=what)
        if cache_file is not None:
            try:
                _save_atomic({"images": images, "keep": keep}, cache_file)
            except OSError as exc:  # read-only location: still return the data
                warnings.warn(f"could not write decode cache {cache_file}: {exc}; set WMSE_CACHE to a writable "
                              "directory", stacklevel=2)
    elif not bool(keep.all()):
        # Cache hit: repeat the decode-time warning so a reload still reports the skipped files.
        bad = [f for f, k in zip(listing.files, keep.tolist()) if not k]
        warnings.warn(f"{what}: skipped {len(bad)} unreadable image file(s) of {len(listing.files)}: "
                      + "; ".join(bad[:_MAX_SHOWN]) + (" ..." if len(bad) > _MAX_SHOWN else ""), stacklevel=2)
    kept = keep.nonzero().flatten().tolist()
    labels = torch.tensor([listing.labels[i] for i in kept], dtype=torch.int64)
    paths = [listing.files[i] for i in kept]
    return images, labels, paths
