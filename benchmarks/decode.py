"""Decode throughput (img/s and img/s per worker) of wmse.data.decode: threads vs processes, in one run.

Two sets: CIFAR-size JPEGs (32x32, the real CIFAR-10 training files) decoded as they are, and
ImageNet-size JPEGs (400x350, made once from CIFAR files upsampled with PIL's bicubic, JPEG quality 90,
under --big_dir) decoded with resize=256 (shorter side 256, centre crop). Each set is decoded by one
worker in this process (the per-core baseline), then by W threads and W processes (W = --workers,
default the cores this process may use). Pixels go nowhere (no store): this times decoding only.

    python benchmarks/decode.py                       # 5,000 + 500 images
    python benchmarks/decode.py --n 2000 --big_n 200  # quicker

Prints the CPU it ran on, a table, and writes benchmarks/results/decode.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image

from augment import CIFAR_DIR, cpu_info
from wmse.data.decode import CHUNK, decode_stream, default_workers
from wmse.data.imagefolder import list_folder


def make_big(src: list[str], folder: Path, n: int) -> list[str]:
    """n 400x350 JPEGs upsampled from CIFAR files (made once; kept under ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            Image.open(src[i % len(src)]).convert("RGB").resize((400, 350), Image.Resampling.BICUBIC).save(
                path, quality=90)
        out.append(str(path))
    return out


def rate(files: list[str], resize: int | None, workers: int, pool: str) -> float:
    """Images per second decoding ``files`` (best of 2)."""
    best = 0.0
    for _ in range(2):
        chunks = (files[i:i + CHUNK] for i in range(0, len(files), CHUNK))
        t = time.perf_counter()
        n = sum(len(c) for c in decode_stream(chunks, len(files), resize, workers, pool=pool))
        best = max(best, n / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", type=Path, default=CIFAR_DIR)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--big_n", type=int, default=500)
    ap.add_argument("--big_dir", type=Path, default=Path("/work/bigdata/decode-bench-400x350"))
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = ap.parse_args()
    if not args.cifar.is_dir():
        sys.exit(f"skipped: {args.cifar} (the CIFAR-10 JPEG folder) is absent")
    files = list_folder(args.cifar).files
    step = max(1, len(files) // args.n)
    small = files[::step][:args.n]
    sets = {"cifar 32x32": (small, None), "400x350 -> 256": (make_big(files, args.big_dir, args.big_n), 256)}
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']}, avx512_bf16: {cpu['avx512_bf16']}; workers {args.workers}")
    rows = []
    print(f"{'set':16} {'pool':10} {'workers':>7} {'img/s':>9} {'img/s per worker':>17}")
    for name, (fs, resize) in sets.items():
        for pool, w in (("inline", 1), ("threads", args.workers), ("processes", args.workers)):
            r = rate(fs, resize, w, "threads" if pool == "inline" else pool)
            rows.append({"set": name, "pool": pool, "workers": w, "images": len(fs), "img_s": r, "img_s_per_worker": r / w})
            print(f"{name:16} {pool:10} {w:7d} {r:9.0f} {r / w:17.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
