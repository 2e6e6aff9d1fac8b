"""Decoding image files (paths or archive members' bytes) to uint8 arrays, in parallel processes.

What image folders (imagefolder.py) and archives (archive.py) share: which names are images, how one
file becomes pixels (16-bit images scaled to 8 bits, optional square resize), the one warning for
unreadable files, and :func:`decode_stream`, which decodes chunks of sources in worker processes and
yields the results in order while holding only a bounded number of chunks (so the memory a decode
needs does not grow with the number of images).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Union

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "CHUNK", "MAX_SHOWN", "Source", "Decoded", "is_image", "check_resize",
           "decode_one", "decode_chunk", "decode_stream", "default_workers", "warn_skipped", "utf8_only"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CHUNK = 64  # files per decode task: small enough that the chunks in flight stay a few MB each
MAX_SHOWN = 5  # names shown in a warning that lists files
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")

Source = Union[str, bytes, BaseException]  # a path, a member's bytes, or the error reading that member
Decoded = Union[np.ndarray, str]  # uint8 (C, H, W), or the error message of a file that could not be read


def is_image(name: str) -> bool:
    """True for a visible file name with an image extension."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def check_resize(resize: int | None) -> None:
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise ValueError(f"resize={resize!r} must be a positive int (pixels) or None")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (``I;16*``, ``I``) scaled to 8 bits: v -> round(v / 257), so 65535 -> 255 and
    v * 257 -> v exactly (PIL's ``convert("L")`` clips instead: almost every pixel becomes 255)."""
    a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")


def decode_one(src: str | bytes, resize: int | None) -> np.ndarray:
    """Decode one file (a path, or the bytes of an archive member) to uint8 ``(C, H, W)``, C = 1 or 3.

    ``resize=r`` resizes the shorter side to r (bicubic, antialiased by PIL) and center-crops r x r,
    so a folder of mixed sizes stacks into one tensor.
    """
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
        if resize is not None and img.format == "JPEG":
            # DCT-domain downscaling: decodes big JPEGs several times faster, never below `resize`.
            img.draft(img.mode, (resize, resize))
        if img.mode in _SIXTEEN_BIT:
            img = _to_8bit(img)
        img = img.convert("L") if img.mode in ("L", "1") else img.convert("RGB")
        if resize is not None:
            # torchvision's Resize(resize) + CenterCrop(resize) sizes and offsets.
            w, h = img.size
            nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = int(round((nw - resize) / 2.0)), int(round((nh - resize) / 2.0))
            img = img.crop((left, top, left + resize, top + resize))
        a = np.asarray(img)
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def decode_chunk(sources: list[Source], resize: int | None) -> list[Decoded]:
    """Decode a chunk; an unreadable file yields its error message (str) instead of an array."""
    out: list[Decoded] = []
    for src in sources:
        try:
            if isinstance(src, BaseException):
                raise src
            out.append(decode_one(src, resize))
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def default_workers() -> int:
    """Decode processes: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _pool(kind: str, workers: int) -> Executor:
    if kind == "threads":
        return ThreadPoolExecutor(max_workers=workers)
    # fork: workers start in milliseconds and need nothing pickled but the sources; they only run PIL.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def decode_stream(chunks: Iterable[list[Source]], total: int, resize: int | None = None,
                  workers: int | None = None, what: str = "images", pool: str = "processes") -> Iterator[list[Decoded]]:
    """Decode chunks of sources in parallel and yield each chunk's results, in order.

    Args:
        chunks: lists of sources; may be a generator that reads them (archive members) in this process.
        total: the number of sources (for progress lines on long decodes).
        workers: parallel decoders (default :func:`default_workers`); 1, or a set of at most one chunk,
            decodes in this process.
        pool: ``"processes"`` (PIL holds the GIL for much of a small image's decode) or ``"threads"``.
    At most ``2 * workers`` chunks are in flight, so the memory held does not depend on ``total``.
    """
    workers = workers or default_workers()
    start = last = time.monotonic()
    done = 0

    def progress(n: int) -> None:
        nonlocal last, done
        done += n
        now = time.monotonic()
        if now - last > 5.0:  # progress on long decodes only
            print(f"wmse: decoding {what}: {done}/{total} ({now - start:.0f} s)", file=sys.stderr)
            last = now

    if workers == 1 or total <= CHUNK:
        for chunk in chunks:
            out = decode_chunk(chunk, resize)
            progress(len(out))
            yield out
        return
    pending: deque = deque()
    with _pool(pool, workers) as executor:
        for chunk in chunks:
            pending.append(executor.submit(decode_chunk, chunk, resize))
            while len(pending) >= 2 * workers:
                out = pending.popleft().result()
                progress(len(out))
                yield out
        while pending:
            out = pending.popleft().result()
            progress(len(out))
            yield out


def warn_skipped(what: str, bad: list[str], total: int, stacklevel: int = 3) -> None:
    """The one warning for unreadable images (``bad``: "path" or "path (error)"), at decode and on cache hits."""
    warnings.warn(f"{what}: skipped {len(bad)} unreadable image file(s) of {total}: " + "; ".join(bad[:MAX_SHOWN])
                  + (" ..." if len(bad) > MAX_SHOWN else ""), stacklevel=stacklevel)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.listdir's surrogate escapes of undecodable bytes
        return False


def utf8_only(paths: list[str], where: str, stacklevel: int = 3) -> list[str]:
    """``paths`` without those whose name is not valid UTF-8 (one warning naming them by their bytes).

    Such names cannot go into the cache key or the store's header, and print as mojibake; skipping them
    lets the rest of the folder train.
    """
    bad = [p for p in paths if not _is_utf8(p)]
    if not bad:
        return paths
    shown = ", ".join(repr(os.fsencode(p)) for p in bad[:MAX_SHOWN]) + (" ..." if len(bad) > MAX_SHOWN else "")
    warnings.warn(f"{where}: skipped {len(bad)} file(s) whose name is not valid UTF-8 (rename them to use "
                  f"them): {shown}", stacklevel=stacklevel)
    bad_set = set(bad)
    return [p for p in paths if p not in bad_set]
