"""Decode cache: reuse without decoding, rebuild when the folder or the options change."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wmse.data.imagefolder as imagefolder
import wmse.data.store as store_mod
from wmse.data import load


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Point the cache at tmp_path and count real decodes."""
    monkeypatch.setenv("WMSE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = imagefolder.decode_files

    def counting(files, *args, **kwargs):
        calls.append(len(files))
        return real(files, *args, **kwargs)

    monkeypatch.setattr(imagefolder, "decode_files", counting)
    return calls


def make_tree(root: Path, n: int = 6, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / ("a" if i % 2 else "b") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*"))


def test_second_load_reuses_cache_without_decoding(tmp_path, counted):
    make_tree(tmp_path / "tree")
    first = load("folder", root=tmp_path / "tree")
    assert counted == [6] and len(cache_files(tmp_path)) == 1
    assert all(p.suffix == ".wstore" and not p.name.startswith(".tmp") for p in cache_files(tmp_path))
    second = load("folder", root=tmp_path / "tree")
    assert counted == [6]  # no second decode
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.paths == second.paths and first.classes == second.classes


@pytest.mark.parametrize("change", ["rewrite", "touch", "add", "remove", "resize"])
def test_changed_folder_or_options_rebuild(tmp_path, counted, change):
    root = tmp_path / "tree"
    make_tree(root)
    before = load("folder", root=root)
    target = root / "a" / "1.png"
    kwargs = {}
    if change == "rewrite":  # same name, new pixels (size unchanged, mtime moves)
        Image.fromarray(np.full((12, 12, 3), 7, dtype=np.uint8)).save(target)
        st = os.stat(target)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "touch":
        st = os.stat(target)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "add":
        Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(root / "a" / "9.png")
    elif change == "remove":
        target.unlink()
    else:
        kwargs = {"resize": 8}
    after = load("folder", root=root, **kwargs)
    assert len(counted) == 2 and len(cache_files(tmp_path)) == 2
    if change == "rewrite":
        idx = after.paths.index(str(target))
        assert after.images[idx].eq(7).all() and not torch.equal(before.images, after.images)
    if change in ("add", "remove"):
        assert len(after) == len(before) + (1 if change == "add" else -1)
    if change == "resize":
        assert after.images.shape[-2:] == (8, 8)
    load("folder", root=root, **kwargs)
    assert len(counted) == 2  # the rebuilt cache is reused in turn


def test_cache_off_and_unwritable_cache(tmp_path, counted, monkeypatch):
    make_tree(tmp_path / "tree")
    load("folder", root=tmp_path / "tree", cache=False)
    load("folder", root=tmp_path / "tree", cache=False)
    assert counted == [6, 6] and cache_files(tmp_path) == []

    monkeypatch.setattr(store_mod, "_unwritable", lambda folder: "no write permission")  # root may write anywhere
    with pytest.warns(UserWarning, match="no write permission.*WMSE_CACHE"):
        ds = load("folder", root=tmp_path / "tree")
    assert len(ds) == 6 and cache_files(tmp_path) == []


def test_cache_path_that_is_a_file_says_so(tmp_path, counted, monkeypatch):
    make_tree(tmp_path / "tree")
    (tmp_path / "cachefile").write_text("not a folder")
    monkeypatch.setenv("WMSE_CACHE", str(tmp_path / "cachefile"))
    with pytest.warns(UserWarning, match=r"cachefile \(it is a file, not a folder\).*WMSE_CACHE"):
        ds = load("folder", root=tmp_path / "tree")
    assert len(ds) == 6 and counted == [6] and (tmp_path / "cachefile").read_text() == "not a folder"


def test_corrupt_cache_file_is_rebuilt(tmp_path, counted):
    make_tree(tmp_path / "tree")
    first = load("folder", root=tmp_path / "tree").images.clone()  # the mapping would die with the file (SIGBUS)
    (cache_file,) = cache_files(tmp_path)
    cache_file.write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="damaged decode cache"):
        again = load("folder", root=tmp_path / "tree")
    assert counted == [6, 6] and torch.equal(first, again.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load("folder", root=tmp_path / "tree")  # rewritten cache: clean hit, no warning
    assert counted == [6, 6]


def test_skipped_files_are_reported_again_on_cache_hit(tmp_path, counted):
    make_tree(tmp_path / "tree")
    (tmp_path / "tree" / "a" / "zz.jpg").write_bytes(b"nope")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        first = load("folder", root=tmp_path / "tree")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable .*zz\.jpg"):
        second = load("folder", root=tmp_path / "tree")
    assert counted == [7] and len(first) == len(second) == 6
    assert torch.equal(first.labels, second.labels) and first.paths == second.paths
