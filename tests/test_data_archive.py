"""Datasets read from one archive (.zip, .tar, .tar.gz): the same images, labels, classes and order as the
extracted folder through ``load("folder")``; corrupt members skipped, unsafe members refused, cached."""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wmse.data.archive as archive_mod
from wmse.data import load, read_member

REAL_CIFAR = Path("/work/shared/datasets/cifar10-jpeg/train")
needs_cifar = pytest.mark.skipif(not REAL_CIFAR.is_dir(),
                                 reason=f"real CIFAR-10 JPEG folder {REAL_CIFAR} absent (see /work/shared/datasets)")
FORMATS = ["zip", "tar", "tar.gz", "tgz", "tar.xz"]


def _png(path: Path, rng: np.random.Generator, shape=(10, 10, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def _extras(root: Path, rng: np.random.Generator) -> None:
    """What both list_folder and the archive reader must ignore: hidden entries, non-images, empty classes."""
    _png(root / ".hidden" / "h.png", rng)
    cls = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[0]
    _png(cls / ".ghost.png", rng)
    (cls / "notes.txt").write_text("not an image")
    (root / "__MACOSX" / cls.name).mkdir(parents=True)
    (root / "__MACOSX" / cls.name / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / "empty_class").mkdir()
    (root / "empty_class" / "readme.md").write_text("no image here")


def _real_tree(root: Path) -> None:
    """3 classes x 40 real CIFAR-10 JPEGs (files named directly: listing 50,000 files is slow)."""
    for cls in ("airplane", "cat", "truck"):
        for i in range(0, 400, 10):
            (root / cls).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REAL_CIFAR / cls / f"{i:04d}.jpg", root / cls / f"{i:04d}.jpg")
    _extras(root, np.random.default_rng(0))


def _png_tree(root: Path) -> None:
    """Generated PNGs with nested subfolders: os.walk order (a folder's files before its subfolders)."""
    rng = np.random.default_rng(1)
    for name in ("b/m.png", "b/a/x.png", "b/a/deeper/w.png", "b/n/y.png", "b/z.png", "a/1.png", "a/0.png",
                 "c d/é.png", "c d/sub dir/q.PNG"):
        _png(root / name, rng)
    gray = root / "a" / "g.png"
    Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(gray)  # mixed gray + RGB -> RGB
    _extras(root, rng)


def _flat_tree(root: Path) -> None:
    rng = np.random.default_rng(2)
    for i in (3, 1, 2, 10):
        _png(root / f"img{i}.png", rng, (8, 8))
    (root / "list.csv").write_text("x")


def _files(src: Path) -> list[Path]:
    return [p for p in sorted(src.rglob("*")) if p.is_file()]


def make_archive(src: Path, dest: Path, prefix: str = "", seed: int = 0,
                 compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Archive every file under ``src`` as ``prefix + relative path``, in a shuffled order (the reader must sort).

    Tars without a prefix name their members ``./rel`` as ``tar -C src -cf x.tar .`` does.
    """
    files = _files(src)
    random.Random(seed).shuffle(files)
    names = [prefix + p.relative_to(src).as_posix() for p in files]
    if dest.name.endswith(".zip"):
        with zipfile.ZipFile(dest, "w", compression=compression) as zf:
            if prefix:
                zf.writestr(zipfile.ZipInfo(prefix), b"")  # an explicit directory entry, as zip -r writes
            for p, name in zip(files, names):
                zf.write(p, name)
    else:
        mode = {"tar": "w", "tar.gz": "w:gz", "tgz": "w:gz", "tar.xz": "w:xz"}[dest.name.split(".", 1)[1]]
        with tarfile.open(dest, mode) as tf:
            for p, name in zip(files, names):
                tf.add(p, arcname=name if prefix else f"./{name}", recursive=False)
    return dest


def _relative(paths: list[str], base: Path) -> list[str]:
    return [Path(p).relative_to(base).as_posix() for p in paths]


def _members(paths: list[str], archive: Path) -> list[str]:
    head = f"{archive}/"
    assert all(p.startswith(head) for p in paths)
    return [p[len(head):] for p in paths]


def assert_same(got, ref) -> None:
    assert torch.equal(got.images, ref.images)
    assert torch.equal(got.labels, ref.labels)
    assert got.classes == ref.classes


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Extracted trees, each at ``<base>/<name>/train`` (the folder the archives wrap or hold)."""
    base = tmp_path_factory.mktemp("trees")
    made = {}
    for name, build in (("real", _real_tree), ("png", _png_tree), ("flat", _flat_tree)):
        if name == "real" and not REAL_CIFAR.is_dir():
            continue
        build(base / name / "train")
        made[name] = base / name / "train"
    return made


# Every format x (images at the top | under one wrapping folder), for real JPEGs, nested PNGs and a flat set
# (a wrapped flat set is one class: test_wrapped_flat_set_is_one_class).
CASES = [pytest.param(tree, wrapped, fmt, id=f"{tree}-{'wrapped' if wrapped else 'top'}-{fmt}",
                      marks=[needs_cifar] if tree == "real" else [])
         for tree in ("real", "png", "flat") for wrapped in (False, True) for fmt in FORMATS
         if not (tree == "flat" and wrapped)]


@pytest.mark.parametrize("tree,wrapped,fmt", CASES)
def test_archive_reads_like_the_extracted_folder(trees, tmp_path, tree, wrapped, fmt):
    folder = trees[tree]
    arc = make_archive(folder, tmp_path / f"data.{fmt}", prefix="train/" if wrapped else "")
    ref = load("folder", root=folder, cache=False)
    got = load("folder", root=arc, cache=False)
    assert_same(got, ref)
    assert _members(got.paths, arc) == _relative(ref.paths, folder.parent if wrapped else folder)
    assert got.name == f"folder:data.{fmt}" and len(got) == len(ref) > 0
    if tree == "png":  # os.walk order, not plain sorted order
        assert _relative(ref.paths, folder)[3:8] == ["b/m.png", "b/z.png", "b/a/x.png", "b/a/deeper/w.png",
                                                      "b/n/y.png"]
    if tree == "flat":
        assert got.classes == [] and got.labels.eq(-1).all()
    else:
        assert len(got.classes) == 3


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
                         ids=["stored", "bzip2", "lzma"])
def test_zip_compression_methods(trees, tmp_path, compression):
    arc = make_archive(trees["png"], tmp_path / "p.zip", compression=compression)
    assert_same(load("folder", root=arc, cache=False), load("folder", root=trees["png"], cache=False))


def test_wrapped_flat_set_is_one_class(trees, tmp_path):
    folder = trees["flat"]
    arc = make_archive(folder, tmp_path / "flat.zip", prefix="imgs/")
    (tmp_path / "x" / "imgs").mkdir(parents=True)
    for p in _files(folder):
        shutil.copyfile(p, tmp_path / "x" / "imgs" / p.name)
    got = load("folder", root=arc, cache=False)
    assert_same(got, load("folder", root=tmp_path / "x", cache=False))
    assert got.classes == ["imgs"] and got.labels.eq(0).all()


def test_reported_paths_read_back(trees, tmp_path):
    arc = make_archive(trees["png"], tmp_path / "p.tar.gz", prefix="train/")
    ds = load("folder", root=arc, cache=False)
    assert ds.paths[0] == f"{arc}/train/a/0.png"
    for i in (0, 4, len(ds) - 1):
        img = np.asarray(Image.open(io.BytesIO(read_member(ds.paths[i]))).convert("RGB"))
        np.testing.assert_array_equal(ds.images[i].permute(1, 2, 0).numpy(), img)


def test_loose_images_next_to_classes_warn_like_the_folder(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("a/0.png", "b/1.png", "loose.png"):
        _png(tmp_path / "t" / name, rng)
    arc = make_archive(tmp_path / "t", tmp_path / "t.zip")
    with pytest.warns(UserWarning, match="1 image.* next to the class folders are ignored"):
        ref = load("folder", root=tmp_path / "t", cache=False)
    for attempt in ("decode", "cache hit"):  # warned again on a hit, as a folder is on every load
        with pytest.warns(UserWarning, match=r"1 image.* next to the class folders are ignored .*t\.zip/loose\.png"):
            got = load("folder", root=arc)
        assert_same(got, ref)


def _unreadable_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "unreadable" in str(w.message)]


def test_corrupt_members_skipped_with_one_warning(tmp_path):
    rng = np.random.default_rng(4)
    for name in ("cat/0.png", "cat/1.png", "dog/2.png", "dog/3.png"):
        _png(tmp_path / "t" / name, rng)
    (tmp_path / "t" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "t" / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[:150])
    with pytest.warns(UserWarning) as ref_record:
        ref = load("folder", root=tmp_path / "t")
    for fmt in ("zip", "tar.gz"):
        arc = make_archive(tmp_path / "t", tmp_path / f"t.{fmt}")
        for attempt in ("decode", "cache hit"):
            with pytest.warns(UserWarning) as record:
                got = load("folder", root=arc)
            (msg,) = _unreadable_warnings(record)  # one warning, as for the folder
            assert "skipped 2 unreadable image file(s) of 6" in msg and "\n" not in msg, attempt
            assert f"{arc}/cat/broken.jpg" in msg and f"{arc}/dog/truncated.jpg" in msg
            assert_same(got, ref)
    assert len(_unreadable_warnings(ref_record)) == 1


def test_zip_member_with_bad_data_is_skipped(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("a/0.png", "a/1.png", "b/2.png"):
        _png(tmp_path / "t" / name, rng)
    arc = make_archive(tmp_path / "t", tmp_path / "t.zip")
    with zipfile.ZipFile(arc) as zf:
        info = zf.getinfo("a/1.png")
    raw = bytearray(arc.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header: 30 bytes + name
    for k in range(start + 5, start + min(info.compress_size, 40)):
        raw[k] ^= 0xFF
    arc.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable .*t\.zip/a/1\.png"):
        got = load("folder", root=arc, cache=False)
    assert [Path(p).name for p in got.paths] == ["0.png", "2.png"] and got.labels.tolist() == [0, 1]


@pytest.fixture
def counted(monkeypatch):
    """Count archive decodes and archive opens."""
    calls = {"decode": 0, "open": 0}
    real_decode, real_open = archive_mod.decode_stream, archive_mod.open_archive

    def decode(*args, **kwargs):
        calls["decode"] += 1
        return real_decode(*args, **kwargs)

    def opened(*args, **kwargs):
        calls["open"] += 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(archive_mod, "decode_stream", decode)
    monkeypatch.setattr(archive_mod, "open_archive", opened)
    return calls


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_cache_hit_then_rebuilt_when_the_archive_changes(trees, tmp_path, counted, fmt):
    arc = make_archive(trees["png"], tmp_path / f"p.{fmt}", prefix="train/")
    first = load("folder", root=arc)
    cache_dir = tmp_path / "cache"
    assert counted == {"decode": 1, "open": 1} and len(list(cache_dir.glob("*.wstore"))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = load("folder", root=arc)
    assert counted == {"decode": 1, "open": 1}  # a hit neither decodes nor opens the archive
    assert_same(second, first) and second.paths == first.paths
    assert oct(stat.S_IMODE(next(cache_dir.glob("*.wstore")).stat().st_mode)) == "0o644"
    st = os.stat(arc)
    os.utime(arc, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    assert_same(load("folder", root=arc), first)
    assert counted["decode"] == 2
    make_archive(trees["png"], arc, prefix="train/", seed=1)  # rewritten: new member order (size may match)
    os.utime(arc, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert_same(load("folder", root=arc), first)
    assert counted["decode"] == 3
    if fmt == "zip":  # size changes, mtime kept: a new member
        with zipfile.ZipFile(arc, "a") as zf:
            buf = io.BytesIO()
            Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
            zf.writestr("train/a/zz.png", buf.getvalue())
        os.utime(arc, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
        grown = load("folder", root=arc)
        assert counted["decode"] == 4 and len(grown) == len(first) + 1
    load("folder", root=arc, resize=6)  # another resize: another cache entry
    assert counted["decode"] == (5 if fmt == "zip" else 4)
    load("folder", root=arc, cache=False)
    assert counted["decode"] == (6 if fmt == "zip" else 5)


def test_unsafe_tar_members_are_not_read(tmp_path):
    rng = np.random.default_rng(6)
    _png(tmp_path / "ok.png", rng)
    outside = tmp_path / "outside.png"
    _png(outside, rng)
    data = (tmp_path / "ok.png").read_bytes()
    arc = tmp_path / "evil.tar"
    with tarfile.open(arc, "w") as tf:
        def add(name, payload=data, **attrs):
            info = tarfile.TarInfo(name)
            for k, v in attrs.items():
                setattr(info, k, v)
            if info.isreg():
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
        add("cls/ok.png")
        add("/abs/cls/abs.png")
        add("../cls/up.png")
        add("cls/../../up2.png")
        add("cls/link.png", type=tarfile.SYMTYPE, linkname=str(outside))
        add("cls/inside_link.png", type=tarfile.SYMTYPE, linkname="ok.png")
        add("cls/hard.png", type=tarfile.LNKTYPE, linkname="cls/ok.png")
        add("cls/fifo.png", type=tarfile.FIFOTYPE)
    for attempt in ("decode", "cache hit"):
        with pytest.warns(UserWarning, match=r"ignored 7 member\(s\) that are not plain files") as record:
            ds = load("folder", root=arc)
        assert ds.paths == [f"{arc}/cls/ok.png"] and ds.classes == ["cls"]
        assert sum("ignored 7" in str(w.message) for w in record) == 1, attempt
    assert not (tmp_path / "cls").exists() and not Path("/abs").exists()  # nothing extracted
    # Stricter than PEP 706's "data" filter (Python >= 3.10.12 / 3.11.4): whatever it refuses is refused here too.
    if not hasattr(tarfile, "data_filter"):
        return
    with tarfile.open(arc) as tf:
        for member in tf.getmembers():
            try:
                tarfile.data_filter(member, str(tmp_path / "dest"))
            except tarfile.FilterError:
                assert f"{arc}/{member.name}" not in ds.paths


def test_unsafe_zip_members_are_not_read(tmp_path):
    rng = np.random.default_rng(7)
    _png(tmp_path / "ok.png", rng)
    data = (tmp_path / "ok.png").read_bytes()
    arc = tmp_path / "evil.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("cls/ok.png", data)
        zf.writestr("../up.png", data)
        zf.writestr("cls/../../up2.png", data)
        link = zipfile.ZipInfo("cls/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, str(tmp_path / "ok.png"))
    with zipfile.ZipFile(arc, "a") as zf:  # ZipInfo keeps a leading "/" that writestr(str) would too
        zf.writestr(zipfile.ZipInfo("/abs.png"), data)
    with pytest.warns(UserWarning, match=r"ignored 4 member\(s\)"):
        ds = load("folder", root=arc, cache=False)
    assert ds.paths == [f"{arc}/cls/ok.png"]


def test_archive_without_images_and_bad_files_are_one_clear_error(tmp_path):
    arc = tmp_path / "docs.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("readme.txt", "hello")
        zf.writestr("cls/.hidden.png", b"x")
        zf.writestr("cls/notes.md", "x")
    for root, err, pattern in ((arc, FileNotFoundError, r"docs\.zip holds no image file"),
                               (tmp_path / "missing.tar.gz", FileNotFoundError, "does not exist.*--data_dir"),
                               (tmp_path / "garbage.zip", ValueError, "not a readable zip archive"),
                               (tmp_path / "garbage.tgz", ValueError, "not a readable tar archive"),
                               (tmp_path / "list.csv", ValueError, "is a file, not an image folder or an archive")):
        if root.name != "docs.zip" and "missing" not in root.name:
            root.write_bytes(b"\x00 not an archive " * 10)
        with pytest.raises(err, match=pattern) as info:
            load("folder", root=root)
        assert "\n" not in str(info.value)


def test_tiny_imagenet_zip_when_not_extracted(tmp_path):
    rng = np.random.default_rng(8)
    base = tmp_path / "extracted" / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01\tone\n")
    for w in wnids:
        for j in range(2):
            _png(base / "train" / w / "images" / f"{w}_{j}.JPEG", rng)
        (base / "train" / w / f"{w}_boxes.txt").write_text("box")
    rows = []
    for j, w in enumerate(["n03", "n01", "n03", "n02"]):
        _png(base / "val" / "images" / f"val_{j}.JPEG", rng)
        rows.append(f"val_{j}.JPEG\t{w}\t0\t0\t9\t9")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    for j in range(2):
        _png(base / "test" / "images" / f"test_{j}.JPEG", rng)
    (tmp_path / "zipped").mkdir()
    arc = make_archive(base, tmp_path / "zipped" / "tiny-imagenet-200.zip", prefix="tiny-imagenet-200/")
    for split in ("train", "val", "test"):
        ref = load("tiny_imagenet", split, root=tmp_path / "extracted")
        for root in (tmp_path / "zipped", arc):  # the folder holding the zip, or the zip itself
            got = load("tiny_imagenet", split, root=root)
            assert_same(got, ref)
            assert _members(got.paths, arc) == _relative(ref.paths, base.parent)
            assert got.name == f"tiny_imagenet/{split}"
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip"):
        load("tiny_imagenet", "train", root=tmp_path / "nowhere")
