"""The decoded-image store (store.py): pixels, labels, classes and paths equal to an independent decode of the
folder and of the archive; damaged stores rebuilt, never trained on; one store mapped by several processes;
decode memory independent of the number of images; a store that cannot fit refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wmse.data.store as store_mod
from wmse.data import load

from test_reliability import TINY as RELIABILITY_TINY

TINY = [*RELIABILITY_TINY, "--max_steps", "1"]  # a one-step CLI run


@pytest.fixture
def cache(tmp_path):
    """The store folder (conftest points WMSE_CACHE here)."""
    return tmp_path / "cache"


def make_tree(root: Path, n: int = 80, size: int = 12, seed: int = 0) -> None:
    """n PNGs in 2 classes (some grayscale: the set is stored as RGB, gray replicated)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / ("cat" if i % 2 else "dog") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (size, size) if i % 7 == 3 else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def pil_pixels(path: str) -> np.ndarray:
    """Independent reference: PIL's own decode, as (3, H, W)."""
    return np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)


def stores(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.wstore"))


def test_store_round_trips_folder_and_archive(tmp_path, cache):
    make_tree(tmp_path / "tree")
    ds = load("folder", root=tmp_path / "tree")  # 80 files: more than one chunk, decoded in processes
    files = sorted(str(p) for p in (tmp_path / "tree").rglob("*.png"))
    assert ds.paths == files and ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [0 if "/cat/" in f else 1 for f in files]
    ref = np.stack([pil_pixels(f) for f in files])
    assert ds.images.shape == (80, 3, 12, 12) and np.array_equal(ds.images.numpy(), ref)
    arc = tmp_path / "tree.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        for f in reversed(files):  # archive order differs from the listing order
            zf.write(f, os.path.relpath(f, tmp_path / "tree"))
    got = load("folder", root=arc)
    assert torch.equal(got.images, ds.images) and torch.equal(got.labels, ds.labels) and got.classes == ds.classes
    assert got.paths == [f"{arc}/{os.path.relpath(f, tmp_path / 'tree')}" for f in files]
    again = load("folder", root=arc)  # a hit: the same, mapped from the store
    assert torch.equal(again.images, ds.images) and again.paths == got.paths and len(stores(cache)) == 2


def test_store_is_a_shared_read_only_mapping(tmp_path, cache):
    make_tree(tmp_path / "tree", n=10)
    ds = load("folder", root=tmp_path / "tree")
    (path,) = stores(cache)
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert not maps or str(path) in maps
    before = path.read_bytes()
    ds.images[0].fill_(0)  # copy-on-write: the process's own page changes, the file does not
    assert path.read_bytes() == before and load("folder", root=tmp_path / "tree").images[0].any()


def _damage(path: Path, how: str) -> None:
    if how == "64 bytes":
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(4096 + (size - 4096) // 3)  # inside the pixels
            f.write(os.urandom(64))
    else:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)


@pytest.mark.parametrize("how", ["64 bytes", "truncated"])
def test_damaged_store_is_rebuilt_with_a_warning(tmp_path, cache, how):
    make_tree(tmp_path / "tree", n=30, size=32)
    first = load("folder", root=tmp_path / "tree").images.clone()  # a mapping dies with its file (SIGBUS)
    (path,) = stores(cache)
    _damage(path, how)
    with pytest.warns(UserWarning, match="damaged decode cache"):
        again = load("folder", root=tmp_path / "tree")
    assert torch.equal(again.images, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(load("folder", root=tmp_path / "tree").images, first)  # the rebuilt store is whole


def test_store_checked_with_the_block_size_its_header_names(tmp_path, cache, monkeypatch):
    make_tree(tmp_path / "tree", n=10)
    with monkeypatch.context() as m:
        m.setattr(store_mod, "BLOCK", 1000)  # a store written by another version's block size
        first = load("folder", root=tmp_path / "tree").images.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "damaged" warning, no rebuild
        assert torch.equal(load("folder", root=tmp_path / "tree").images, first)
    assert len(stores(cache)) == 1


def test_two_processes_map_one_store(tmp_path, cache):
    make_tree(tmp_path / "tree", n=20)
    load("folder", root=tmp_path / "tree")
    code = f"""
        import os
        from wmse.data import load
        ds = load("folder", root={str(tmp_path / 'tree')!r})
        mapped = sorted({{line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(".wstore")}})
        print(int(ds.images.double().sum()), os.stat(mapped[0]).st_ino, len(mapped))
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    (path,) = stores(cache)
    assert outs[0] == outs[1] == [str(int(load("folder", root=tmp_path / "tree").images.double().sum())),
                                  str(path.stat().st_ino), "1"]


def test_decode_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak RSS growth while decoding 200 vs 800 images (resized to 128 px: 49 KB each, 29 MB apart):
    a decode that held the images would grow by at least that difference (twice, with a stack)."""
    code = """
        import resource, sys
        from pathlib import Path
        import numpy as np
        from PIL import Image
        root = Path(sys.argv[1]); n = int(sys.argv[2])
        rng = np.random.default_rng(0)
        for i in range(n):
            (root / str(i % 2)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / str(i % 2) / f"{i}.png")
        from wmse.data import load
        load("folder", root=root, resize=2)  # warm up imports and the pool
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ds = load("folder", root=root, resize=128)
        assert ds.images.shape == (n, 3, 128, 128)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """
    growth = {}
    for n in (200, 800):
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path / f"t{n}"), str(n)],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "WMSE_CACHE": str(tmp_path / "cache")})
        assert proc.returncode == 0, proc.stderr[-2000:]
        growth[n] = float(proc.stdout.split()[-1])
    assert growth[800] - growth[200] < 12.0, growth  # MB; the decoded data differ by 29 MB


def test_store_that_cannot_fit_is_refused_before_decoding(tmp_path, cache, monkeypatch):
    make_tree(tmp_path / "tree", n=10)
    monkeypatch.setattr(store_mod, "free_bytes", lambda folder: 1000)
    with pytest.raises(OSError, match=r"needs 4\.3 kB \(10 images of 3x12x12\) but .* has 1\.0 kB free.*WMSE_CACHE") as err:
        load("folder", root=tmp_path / "tree")
    assert str(cache) in str(err.value) and "WMSE_CACHE" in str(err.value)
    assert not list(cache.glob("*"))  # no store, no temporary file left


def wmse_cli(*args, env, code_prefix: str = ""):
    """`wmse ARGS` in a subprocess (``code_prefix`` runs first in that process, e.g. to simulate a full disk)."""
    code = f"{code_prefix}\nimport sys\nfrom wmse.cli import main\nsys.exit(main({list(map(str, args))!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_cli_refuses_a_store_that_cannot_fit_and_rebuilds_a_damaged_one(tmp_path):
    make_tree(tmp_path / "tree", n=64, size=16)
    env = {"WMSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = [*TINY, "--data_dir", tmp_path / "tree", "--out_dir", tmp_path / "runs"]
    full = "import wmse.data.store as s; s.free_bytes = lambda folder: 10_000"
    proc = wmse_cli("pretrain", *common, "--run_name", "full", env=env, code_prefix=full)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and "needs" in line and str(tmp_path / "cache") in line and "WMSE_CACHE" in line
    assert not (tmp_path / "runs" / "full" / "checkpoint.pt").exists()
    proc = wmse_cli("pretrain", *common, "--run_name", "a", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = stores(tmp_path / "cache")
    _damage(path, "64 bytes")
    proc = wmse_cli("pretrain", *common, "--run_name", "b", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "damaged decode cache" in proc.stderr and "rebuilding" in proc.stderr
    store_mod.read_store(path)  # whole again
