"""Issue 19's data faults (items 3, 4, 9, 10): symlink loops, 16-bit PNGs, zip bombs, non-UTF-8 file names.
Each test failed before its fix."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import wmse.data.archive as archive_mod
from wmse.data import load

from test_reliability import TINY as RELIABILITY_TINY

TINY = [*RELIABILITY_TINY, "--max_steps", "1"]  # a one-step CLI run


def _pngs(folder: Path, n: int, seed: int = 0, size: int = 10) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_symlink_loop_lists_each_image_once(tmp_path):
    root = tmp_path / "tree"
    _pngs(root / "a", 5)
    _pngs(root / "b", 4, seed=1)
    os.symlink(".", root / "a" / "loop")  # a/loop -> a
    os.symlink("../b", root / "a" / "to_b")  # a/to_b -> b: another folder, listed under a (as os.walk would)
    ds = load("folder", root=root)
    assert len(ds) == 5 + 4 + 4 and len(set(ds.paths)) == len(ds)
    assert not any("/loop/" in p for p in ds.paths)


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale (H, W) or RGB (H, W, 3)) written by hand: PIL cannot write 16-bit RGB."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path, channels):
    rng = np.random.default_rng(channels)
    shape = (6, 7) if channels == 1 else (6, 7, 3)
    arrays = [rng.integers(0, 65536, shape, dtype=np.uint16) for _ in range(3)]
    arrays[0].flat[:3] = [0, 65535, 257 * 100]  # the ends and an exact multiple of 257
    (tmp_path / "t").mkdir()
    for i, a in enumerate(arrays):
        (tmp_path / "t" / f"{i}.png").write_bytes(png16(a))
    ds = load("folder", root=tmp_path / "t")
    got = ds.images.numpy()
    ref = np.stack([((a.astype(np.int64) + 128) // 257).astype(np.uint8) for a in arrays])  # round(v / 257)
    ref = ref[:, None] if channels == 1 else ref.transpose(0, 3, 1, 2)
    assert got.shape == ref.shape
    # PIL reads 16-bit RGB by its high byte (v >> 8): at most 1 from round(v / 257); grayscale is exact.
    assert np.abs(got.astype(int) - ref).max() <= (0 if channels == 1 else 1)
    assert got.reshape(-1)[:3].tolist() == [0, 255, 100] if channels == 1 else True
    assert (got == 255).mean() < 0.05  # before the fix, 99.7% of the pixels were clipped to 255


def _zip_with_declared_size(path: Path, members: dict[str, bytes], liar: str, declared: int) -> None:
    """A zip whose member ``liar`` declares ``declared`` bytes in its central directory entry."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02")  # the first central directory entry
    while True:
        name_len, = struct.unpack_from("<H", raw, at + 28)
        if raw[at + 46:at + 46 + name_len].decode() == liar:
            struct.pack_into("<I", raw, at + 24, declared)  # uncompressed size
            break
        extra, comment = struct.unpack_from("<HH", raw, at + 30)
        at += 46 + name_len + extra + comment
    path.write_bytes(bytes(raw))


def _png_bytes(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_zip_member_declaring_2_gib_is_skipped_unread(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    members = {f"a/{i}.png": _png_bytes(rng) for i in range(4)}
    members["a/bomb.png"] = b"\x00" * 4096
    arc = tmp_path / "bomb.zip"
    _zip_with_declared_size(arc, members, "a/bomb.png", 2**31)
    reads = []
    real = archive_mod.zlib.decompressobj
    monkeypatch.setattr(archive_mod.zlib, "decompressobj", lambda *a: reads.append(1) or real(*a))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable .*bomb\.png.*2048 MiB, over the 256 MiB limit"):
        ds = load("folder", root=arc)
    assert len(ds) == 4 and len(reads) == 4  # the bomb was never inflated


def test_real_deflate_bomb_is_skipped_within_bounded_memory(tmp_path, monkeypatch):
    """64 MiB of zeros in a 64 KB member, over a lowered limit; and a member lying about its size (declares 1 KB,
    inflates to 64 MiB) is refused after inflating at most one byte more than it declared."""
    monkeypatch.setattr(archive_mod, "MAX_MEMBER_BYTES", 1 << 20)
    rng = np.random.default_rng(0)
    members = {f"a/{i}.png": _png_bytes(rng) for i in range(3)}
    members["a/zeros.png"] = b"\x00" * (64 << 20)
    members["a/liar.png"] = b"\x00" * (64 << 20)
    arc = tmp_path / "bomb.zip"
    _zip_with_declared_size(arc, members, "a/liar.png", 1024)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable") as rec:
        ds = load("folder", root=arc)
    text = " ".join(str(w.message) for w in rec)
    assert len(ds) == 3 and "zeros.png" in text and "liar.png" in text and "bad CRC-32 or size" in text


def test_tar_member_over_the_limit_is_skipped(tmp_path, monkeypatch):
    import tarfile
    monkeypatch.setattr(archive_mod, "MAX_MEMBER_BYTES", 1000)
    rng = np.random.default_rng(0)
    arc = tmp_path / "t.tar"
    with tarfile.open(arc, "w") as tf:
        for i in range(3):
            data = _png_bytes(rng)
            info = tarfile.TarInfo(f"a/{i}.png")
            info.size = len(data) if i else 5000
            tf.addfile(info, io.BytesIO(data + b"\x00" * (info.size - len(data))))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable .*a/0\.png.*limit"):
        assert len(load("folder", root=arc)) == 2


def test_non_utf8_file_name_is_skipped_with_one_warning_and_the_rest_trains(tmp_path):
    root = tmp_path / "tree"
    _pngs(root / "a", 32, size=16)
    _pngs(root / "b", 32, seed=1, size=16)
    bad = os.path.join(os.fsencode(root / "a"), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    with open(bad, "wb") as f:
        f.write((root / "a" / "0.png").read_bytes())
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) whose name is not valid UTF-8.*caf\\xe9\.png"):
        assert len(load("folder", root=root)) == 64
    env = {**os.environ, "WMSE_CACHE": str(tmp_path / "cache2"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "wmse", "pretrain", *TINY, "--data_dir", str(root),
                           "--out_dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("not valid UTF-8") == 1 and "caf\\xe9.png" in proc.stderr
