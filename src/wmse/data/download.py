"""Download an official archive, verify its md5, and extract it safely."""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["fetch", "md5sum", "download_and_extract", "missing_error"]


def fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (tests monkeypatch this; raises ``urllib.error.URLError`` offline)."""
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
        while True:
            block = resp.read(1 << 20)
            if not block:
                break
            out.write(block)


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing_error(what: str, expected: list[Path], url: str | None, reason: str = "") -> FileNotFoundError:
    """One-line error naming the expected files and where to get them."""
    shown = ", ".join(str(p) for p in expected[:4]) + (" ..." if len(expected) > 4 else "")
    fix = f"download {url} and extract it there" if url else "put the files there"
    tail = f" ({reason})" if reason else ""
    return FileNotFoundError(f"{what}: missing {shown}; {fix}, or pass --data_dir (root= in Python) or set WMSE_DATA "
                             f"to where they are{tail}")


def download_and_extract(url: str, md5: str, root: Path) -> None:
    """Download a .tar.gz into ``root``, check its md5, and extract it there.

    Raises:
        OSError (URLError): when the network is unreachable (callers turn this into one clear error).
        ValueError: when the md5 does not match (the partial download is removed).
    """
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[-1]
    if not (archive.exists() and md5sum(archive) == md5):
        fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".download-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            print(f"wmse: downloading {url} -> {archive}", file=sys.stderr)
            fetch(url, tmp)
            got = md5sum(tmp)
            if got != md5:
                raise ValueError(f"download of {url}: md5 {got} != expected {md5}; the file is corrupt or changed, "
                                 "delete it and retry")
            os.replace(tmp, archive)
        finally:
            tmp.unlink(missing_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        # The "data" filter refuses absolute paths, links out of root and device files.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - Python without the PEP 706 backport
            tar.extractall(root)


def ensure_archive(what: str, expected: list[Path], url: str, md5: str, root: Path, download: bool) -> None:
    """Make sure every path in ``expected`` exists, downloading ``url`` into ``root`` if allowed."""
    if all(p.exists() for p in expected):
        return
    if not download:
        raise missing_error(what, expected, url, "download=False")
    try:
        download_and_extract(url, md5, root)
    except (urllib.error.URLError, OSError) as exc:
        raise missing_error(what, expected, url, f"download failed: {exc}") from exc
    if not all(p.exists() for p in expected):
        raise missing_error(what, expected, url, "the downloaded archive did not contain them")
