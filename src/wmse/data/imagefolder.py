"""Image folders: list, decode in parallel processes once, into a memory-mapped store (store.py).

The store's key is a hash of the folder path, the file list with sizes and mtimes, the resize setting and
a format version, so a changed folder (file added, removed, rewritten) rebuilds it. The store holds the
pixels, labels, classes and paths of the decoded files, and names the files that could not be read.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from .dataset import cache_root
from .decode import CHUNK, IMAGE_EXTENSIONS, Decoded, check_resize, decode_stream, is_image, utf8_only
from .store import cached_store, write_store

__all__ = ["IMAGE_EXTENSIONS", "Listing", "list_folder", "decode_files", "load_listing"]

_CACHE_VERSION = "wmse-decode-v2"  # v2: the memory-mapped store (store.py)


@dataclass
class Listing:
    """Files to decode, with their labels (-1 when unlabeled) and class names."""

    files: list[str]
    labels: list[int]
    classes: list[str]


def _images_under(folder: Path) -> list[str]:
    """All image files below ``folder`` (recursive, sorted, hidden entries skipped).

    Symbolic links to directories are followed, each directory once (a link back up, ``loop -> .``,
    would otherwise list the same images again and again until the path grows too long).
    """
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f))
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
    found = {e.path: _images_under(Path(e.path)) for e in subdirs}
    loose = [e.path for e in entries if e.is_file() and is_image(e.name)]
    readable = set(utf8_only([f for fs in found.values() for f in fs] + loose, str(folder), stacklevel=3))
    loose = [f for f in loose if f in readable]
    files: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for sub in subdirs:
        images = [f for f in found[sub.path] if f in readable]
        if images:
            labels.extend([len(classes)] * len(images))
            classes.append(sub.name)
            files.extend(images)
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


def decode_files(files: list[str], resize: int | None = None, workers: int | None = None,
                 what: str = "images") -> Iterator[list[Decoded]]:
    """Decode files in parallel processes: yields the decoded chunks in order (see ``decode.decode_stream``)."""
    chunks = (files[i:i + CHUNK] for i in range(0, len(files), CHUNK))
    return decode_stream(chunks, len(files), resize, workers, what)


def load_listing(folder: Path, listing: Listing, resize: int | None = None, cache: bool = True,
                 what: str = "images", workers: int | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """Decode the files of a listing into its store (store.py), or open the store built before.

    Returns:
        images: uint8 ``(M, C, H, W)`` mapped from the store; labels: int64 ``(M,)``; paths: the M decoded files.
    """
    check_resize(resize)
    key = _cache_key(folder, listing.files, resize)

    def build(path: Path) -> None:
        write_store(path, key, decode_files(listing.files, resize, workers, what), listing.files, listing.labels,
                    listing.classes, what)

    store = cached_store(cache_root(), key, build, what, keep=cache)
    return store.images, store.labels, store.paths
