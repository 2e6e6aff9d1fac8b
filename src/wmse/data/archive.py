"""Image datasets read straight from one archive file: .zip, .tar, .tar.gz / .tgz (also .tar.bz2, .tar.xz).

Members are never extracted to disk. The archive is read in its own order by the calling thread and
handed, 256 members at a time, to the same decoding threads as image folders (PIL releases the GIL):
at most ``2 * workers`` chunks of member bytes are held at once, never the whole archive (the member
list is: one ZipInfo / TarInfo per member). A tar is scanned once for its member list, then read in
offset order with one seek and read per member; a compressed tar is therefore decompressed twice.

What is read (``folder`` semantics, as :func:`~wmse.data.imagefolder.list_folder` on the extracted tree):

* only regular-file members whose path is safe: no absolute path, no ``..`` component; links (symbolic or
  hard, pointing anywhere), devices and the like are refused, with one warning. This is stricter than
  :func:`tarfile.data_filter` (which strips a leading ``/`` and admits links inside the destination),
  and cheaper (it calls ``realpath`` twice per member: benchmarks/README.md, Data);
* hidden entries (any path component starting with ``.``, e.g. ``__MACOSX/._x.jpg``) and members without
  an image extension are ignored;
* class subfolders -> labelled images, classes sorted, images in ``os.walk`` order (a folder's files,
  sorted, before its sorted subfolders); else loose images at the top -> unlabeled (-1);
* one top-level folder wrapping class subfolders (``train/airplane/x.jpg``) is stepped into, once: the
  archive reads as that folder. A single top-level folder holding only images (``cat/x.jpg``) is a
  one-class set, as ``list_folder`` of the extraction directory would give.

Paths: an image read from member ``train/airplane/0001.jpg`` of ``/data/c10.zip`` reports the path
``/data/c10.zip/train/airplane/0001.jpg`` (the archive path as given, ``/``, the member name with any
leading ``./`` dropped); :func:`read_member` reads such a path back.

Cache: decoded like folders into ``cache_root()``, keyed by the archive's resolved path, size and mtime,
the selection (``folder`` or e.g. ``tiny_imagenet/val``), ``resize`` and a format version. The cache
holds the listing too, so a hit opens no archive.
"""

from __future__ import annotations

import hashlib
import io
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from torch import Tensor

from .dataset import cache_root
from .decode import CHUNK, IMAGE_EXTENSIONS, MAX_SHOWN, check_resize, decode_stream, is_image, utf8_only
from .imagefolder import Listing
from .store import cached_store, write_store

__all__ = ["ARCHIVE_SUFFIXES", "is_archive", "open_archive", "Archive", "list_members", "load_archive",
           "read_member"]

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_ARCHIVE_VERSION = "wmse-archive-v2"  # bump when the store or the selection rules change (v2: store.py)
#: Members declaring more bytes than this are skipped unread (a zip bomb's 2 GiB of zeros in 2 MB); the
#: largest photographs are tens of MB.
MAX_MEMBER_BYTES = 256 << 20


def is_archive(path: str | Path) -> bool:
    """True when ``path``'s name ends with one of :data:`ARCHIVE_SUFFIXES` (case-insensitive)."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _clean_name(name: str) -> str | None:
    """A member name normalised (``./a//b`` -> ``a/b``), or None when unsafe (absolute, ``..``, drive)."""
    if name.startswith(("/", "\\")) or (len(name) > 2 and name[0].isalpha() and name[1] == ":" and name[2] in "/\\"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


class Archive:
    """An open archive: ``names`` (safe regular members, archive order), ``refused``, ``read``, ``stream``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.names: list[str] = []
        self.refused: list[str] = []  # unsafe or non-regular members, as named in the archive
        self.random_access = True  # False for a compressed tar: a backward seek decompresses from the start

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def _check_size(self, name: str, size: int) -> None:
        """Refuse a member whose declared size is over :data:`MAX_MEMBER_BYTES`, before reading it."""
        if size > MAX_MEMBER_BYTES:
            raise OSError(f"member declares {size / 2**20:.0f} MiB, over the {MAX_MEMBER_BYTES >> 20} MiB "
                          "limit for one image file (a decompression bomb?); not read")

    def _offset(self, name: str) -> int:
        raise NotImplementedError

    def stream(self, names: Iterable[str]) -> Iterator[tuple[str, bytes | BaseException]]:
        """``(name, bytes)`` for each member of ``names`` (a read error in place of bytes): in the order given
        when members can be read in any order, else in archive order."""
        unique = list(dict.fromkeys(names))
        for name in (unique if self.random_access else sorted(unique, key=self._offset)):
            try:
                yield name, self.read(name)
            except Exception as exc:  # a bad CRC, a truncated archive, an encrypted member
                yield name, exc

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Zip(Archive):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._zf = zipfile.ZipFile(path)
        self._info: dict[str, zipfile.ZipInfo] = {}
        for info in self._zf.infolist():
            if info.is_dir():
                continue
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip was not made on Unix
            clean = _clean_name(info.filename)
            if clean is None or kind not in (0, stat.S_IFREG):
                if kind != stat.S_IFDIR:
                    self.refused.append(info.filename)
                continue
            self._info[clean] = info  # a repeated name: the last one wins, as on extraction
        self.names = list(self._info)

    def read(self, name: str) -> bytes:
        info = self._info[name]
        self._check_size(name, info.file_size)
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return self._zf.read(info)  # encrypted, bzip2, lzma: zipfile's own path
        # Stored / deflated: one seek, two reads and a zlib call (a quarter of ZipFile.read's cost per member).
        f = self._zf.fp
        f.seek(info.header_offset)
        header = f.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"{name}: bad local file header")
        name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
        f.seek(name_len + extra_len, 1)
        data = f.read(info.compress_size)
        if info.compress_type == zipfile.ZIP_DEFLATED:
            # Inflate at most one byte past the declared size: a member lying about its size stays bounded.
            data = zlib.decompressobj(-15).decompress(data, info.file_size + 1)
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise zipfile.BadZipFile(f"{name}: bad CRC-32 or size; the archive is corrupt")
        return data

    def _offset(self, name: str) -> int:
        return self._info[name].header_offset

    def close(self) -> None:
        self._zf.close()


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature, versions, flags, method, time, date, crc, sizes, lengths


class _Tar(Archive):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tf = tarfile.open(path, "r:*")
        self.random_access = isinstance(self._tf.fileobj, io.BufferedReader)  # not gzip/bz2/xz
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in self._tf.getmembers():
            if member.isdir():
                continue
            clean = _clean_name(member.name)
            if clean is None or not member.isreg():
                self.refused.append(member.name)
                continue
            self._members[clean] = member
        self.names = list(self._members)

    def read(self, name: str) -> bytes:
        member = self._members[name]
        self._check_size(name, member.size)
        if member.issparse():  # pragma: no cover - GNU sparse files: let tarfile reassemble them
            with self._tf.extractfile(member) as f:
                return f.read()
        # A regular member's bytes are contiguous: one seek and read (a tenth of extractfile's cost
        # per member); forward seeks in a compressed stream decompress, in archive order once.
        self._tf.fileobj.seek(member.offset_data)
        data = self._tf.fileobj.read(member.size)
        if len(data) != member.size:
            raise OSError(f"tar member {name}: {len(data)} of {member.size} bytes; the archive is truncated")
        return data

    def _offset(self, name: str) -> int:
        return self._members[name].offset_data

    def close(self) -> None:
        self._tf.close()


def open_archive(path: str | Path) -> Archive:
    """Open a zip or tar archive (any compression tarfile reads) for reading members.

    Raises:
        ValueError: the file is not a readable archive of its kind.
    """
    path = Path(path)
    try:
        if str(path).lower().endswith(".zip"):
            return _Zip(path)
        return _Tar(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:  # OSError: gzip's BadGzipFile
        detail = " ".join(str(exc).split())  # tarfile's "r:*" error lists each compression tried, one a line
        raise ValueError(f"{path}: not a readable {'zip' if str(path).lower().endswith('.zip') else 'tar'} "
                         f"archive ({type(exc).__name__}: {detail})") from exc


def _walk_key(rel: str) -> tuple:
    """Sort key giving ``os.walk`` order below a class folder: a folder's files (sorted) before its subfolders."""
    parts = rel.split("/")
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def list_members(names: Iterable[str], where: str) -> Listing:
    """:func:`~wmse.data.imagefolder.list_folder` for member names (see the module docstring).

    Returns a Listing of member names (the wrapper folder, if any, kept in each name).

    Raises:
        FileNotFoundError: no image member.
    """
    names = utf8_only(list(names), where, stacklevel=4)  # tar names keep undecodable bytes as surrogates
    images = [n for n in names if is_image(n.rsplit("/", 1)[-1]) and not any(p.startswith(".") for p in n.split("/"))]
    tops = {n.split("/", 1)[0] for n in images if "/" in n}
    prefix = ""
    if len(tops) == 1 and all("/" in n for n in images) and any(n.count("/") >= 2 for n in images):
        prefix = next(iter(tops)) + "/"  # one folder wrapping class folders: read it as the archive
    rel = [n[len(prefix):] for n in images]
    loose = sorted(r for r in rel if "/" not in r)
    by_class: dict[str, list[str]] = {}
    for r in rel:
        if "/" in r:
            cls, inner = r.split("/", 1)
            by_class.setdefault(cls, []).append(inner)
    if by_class:
        files: list[str] = []
        labels: list[int] = []
        classes = sorted(by_class)
        for label, cls in enumerate(classes):
            inner = sorted(by_class[cls], key=_walk_key)
            files.extend(f"{prefix}{cls}/{i}" for i in inner)
            labels.extend([label] * len(inner))
        if loose:
            warnings.warn(f"{where}: {len(loose)} image(s) next to the class folders are ignored "
                          f"(first: {where}/{prefix}{loose[0]})", stacklevel=3)
        return Listing(files, labels, classes)
    if not loose:
        raise FileNotFoundError(f"archive {where} holds no image file ({', '.join(IMAGE_EXTENSIONS)}) at its top, "
                                "in class folders, or in class folders under one top-level folder")
    return Listing([prefix + r for r in loose], [-1] * len(loose), [])


def _cache_key(archive: Path, kind: str, resize: int | None) -> str:
    st = archive.stat()
    text = f"{_ARCHIVE_VERSION}\0{kind}\0{archive.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{resize}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _chunks(pairs: Iterable[tuple[str, bytes | BaseException]], order: list[str]) -> Iterator[list]:
    chunk: list = []
    for name, data in pairs:
        order.append(name)
        chunk.append(data)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load_archive(archive: str | Path, select: Callable[[Archive], Listing], *, kind: str = "folder",
                 resize: int | None = None, cache: bool = True, what: str = "images",
                 workers: int | None = None) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """Decode the members ``select(archive)`` lists into their store (store.py), or open the store built before.

    Args:
        archive: the archive file.
        select: the open :class:`Archive` -> a Listing of member names, labels and classes
            (``lambda a: list_members(a.names, str(path))`` for an ImageFolder archive).
        kind: names the selection in the cache key (one archive may serve several splits).
    Returns:
        images uint8 ``(M, C, H, W)`` (mapped), labels int64 ``(M,)``, the M paths (``<archive>/<member>``), classes.
    """
    check_resize(resize)
    archive = Path(archive)
    key = _cache_key(archive, kind, resize)
    built = False

    def build(path: Path) -> None:
        nonlocal built
        built = True
        with open_archive(archive) as arc:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                listing = select(arc)
            notes = ([_refused_note(archive, arc.refused)] if arc.refused else []) + [str(w.message) for w in caught]
            for note in notes:
                warnings.warn(note, stacklevel=4)
            order: list[str] = []
            decoded = decode_stream(_chunks(arc.stream(listing.files), order), len(listing.files), resize, workers,
                                    what)
            write_store(path, key, _in_listing_order(decoded, order, listing.files), listing.files, listing.labels,
                        listing.classes, what, notes, prefix=f"{archive}/")

    store = cached_store(cache_root(), key, build, what, keep=cache, prefix=f"{archive}/")
    if not built:  # a hit repeats the warnings of the build (refused members, loose images)
        for note in store.notes:
            warnings.warn(note, stacklevel=3)
    return store.images, store.labels, [f"{archive}/{m}" for m in store.paths], store.classes


def _in_listing_order(decoded: Iterable[list], order: list[str], files: list[str]) -> Iterator[list]:
    """Decoded chunks (archive order, names in ``order`` as read) in the listing's order.

    Zips and plain tars are read in listing order, so each chunk passes straight through. A compressed tar
    is read in archive order: where that differs from the listing's, results wait here until their turn
    (for a tar written by walking the tree, at most about one folder's worth).
    """
    waiting: dict[str, object] = {}
    want = 0
    done = 0
    for chunk in decoded:
        for d in chunk:
            waiting[order[done]] = d
            done += 1
        out = []
        while want < len(files) and files[want] in waiting:
            out.append(waiting.pop(files[want]))
            want += 1
        if out:
            yield out


def _refused_note(archive: Path, refused: list[str]) -> str:
    return (f"{archive}: ignored {len(refused)} member(s) that are not plain files at a safe relative path "
            "(absolute, '..', link or device): " + ", ".join(refused[:MAX_SHOWN])
            + (" ..." if len(refused) > MAX_SHOWN else ""))


def split_member_path(path: str | Path) -> tuple[Path, str]:
    """``"/d/c10.zip/train/a/1.jpg"`` -> ``(Path("/d/c10.zip"), "train/a/1.jpg")``: split at the first archive file."""
    parts = PurePosixPath(str(path)).parts
    for i in range(1, len(parts)):
        head = Path(*parts[:i])
        if is_archive(head) and head.is_file():
            return head, "/".join(parts[i:])
    raise ValueError(f"{path}: not a path inside an archive file ({', '.join(ARCHIVE_SUFFIXES)})")


def read_member(path: str | Path) -> bytes:
    """The bytes of an archive member named by a reported path such as ``/d/c10.zip/train/a/1.jpg``."""
    archive, member = split_member_path(path)
    with open_archive(archive) as arc:
        if member not in arc.names:
            raise FileNotFoundError(f"{archive} has no readable member {member!r}")
        return arc.read(member)
