"""The decoded-image store (wmse.data.store): what opening costs, and batch gathers from the mapping.

1. Cached load of the CIFAR-10 JPEG folder (list 50,000 files + stat each for the key + open the store,
   which checks every CRC-32): the time a run waits before its first step.
2. Opening a store (checks included) of CIFAR-10's size and of ~2 GB (--big_gb), page cache warm and cold
   (cold: the file's pages dropped with posix_fadvise(DONTNEED) first).
3. Batch gathers (``index_select`` of --batch random images, as BatchLoader does on the CPU) from the
   mapped store against the same images in an in-memory tensor, interleaved in one run (warm: every page
   touched once before); and a cold first epoch (pages dropped, then opened and one epoch gathered; the
   open's CRC check reads every page, so the epoch after it finds them cached).
4. The run's data fingerprint (wmse.fingerprint: one hash per image, taken at every start and resume) of
   each store, warm.

    python benchmarks/store.py                      # stores under /work/bigdata/data/store-bench
    python benchmarks/store.py --big_gb 0.5         # quicker

Prints the CPU it ran on, a table, and writes benchmarks/results/store.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from augment import CIFAR_DIR, cpu_info
from wmse.data.store import read_store, write_store
from wmse.fingerprint import data_fingerprint


def synthetic_store(path: Path, n: int, side: int) -> Path:
    """A store of n random (3, side, side) images, written once."""
    if not path.exists():
        rng = np.random.default_rng(0)
        chunks = ([rng.integers(0, 256, (3, side, side), dtype=np.uint8) for _ in range(min(256, n - i))]
                  for i in range(0, n, 256))
        write_store(path, "bench", chunks, [f"{i}" for i in range(n)], [0] * n, ["x"], "bench")
    return path


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gather_ratio(images: torch.Tensor, batch: int, reps: int) -> dict:
    """Median seconds per gather, mapped vs in memory, interleaved; both warm."""
    in_memory = images.clone()
    for t in (images, in_memory):  # touch every page once (a strided sum: no int64 copy of the tensor)
        t.reshape(-1)[::4096].to(torch.int64).sum()
    gen = torch.Generator().manual_seed(0)
    mapped_t, memory_t = [], []
    for _ in range(reps):
        idx = torch.randperm(images.shape[0], generator=gen)[:batch]
        mapped_t.append(timed(lambda: torch.index_select(images, 0, idx)))
        memory_t.append(timed(lambda: torch.index_select(in_memory, 0, idx)))
    m, r = statistics.median(mapped_t), statistics.median(memory_t)
    return {"mapped_ms": 1e3 * m, "in_memory_ms": 1e3 * r, "ratio": m / r}


def cold_epoch(path: Path, batch: int) -> dict:
    drop_cache(path)
    t = time.perf_counter()
    images = read_store(path).images
    opened = time.perf_counter() - t
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    for b in range(0, images.shape[0] - batch + 1, batch):
        torch.index_select(images, 0, perm[b:b + batch])
    return {"open_s": opened, "epoch_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", type=Path, default=CIFAR_DIR)
    ap.add_argument("--dir", type=Path, default=Path("/work/bigdata/data/store-bench"))
    ap.add_argument("--big_gb", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store.json")
    args = ap.parse_args()
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']}, avx512_bf16: {cpu['avx512_bf16']}; torch threads {torch.get_num_threads()}")
    out: dict = {"cpu": cpu}
    if args.cifar.is_dir():
        os.environ["WMSE_CACHE"] = str(args.dir / "cache")
        from wmse.data import load
        load("folder", root=args.cifar)
        hits = [timed(lambda: load("folder", root=args.cifar)) for _ in range(3)]
        out["cifar10_folder_cached_load_s"] = min(hits)
        print(f"cached load of {args.cifar}: {min(hits):.2f} s (best of 3; median {statistics.median(hits):.2f} s)")
    side = 256
    stores = {"cifar10 size (50000x3x32x32)": synthetic_store(args.dir / "cifar.wstore", 50000, 32),
              f"{args.big_gb:g} GB (3x256x256)": synthetic_store(args.dir / f"big{args.big_gb:g}.wstore",
                                                               int(args.big_gb * 1e9 / (3 * side * side)), side)}
    for name, path in stores.items():
        read_store(path)
        warm = min(timed(lambda: read_store(path)) for _ in range(3))
        drop_cache(path)
        cold = timed(lambda: read_store(path))
        images = read_store(path).images
        ratio = gather_ratio(images, args.batch if images.shape[-1] == 32 else 64, args.reps)
        epoch = cold_epoch(path, args.batch if images.shape[-1] == 32 else 64)
        labels = torch.zeros(images.shape[0], dtype=torch.int64)
        fingerprint = timed(lambda: data_fingerprint([(images, labels)], None))
        out[name] = {"bytes": path.stat().st_size, "open_warm_s": warm, "open_cold_s": cold, "gather": ratio,
                     "cold_first_epoch": epoch, "fingerprint_s": fingerprint}
        print(f"{name}: {path.stat().st_size / 1e9:.2f} GB; open (checks included) warm {warm:.3f} s, cold {cold:.2f} s;"
              f" gather mapped {ratio['mapped_ms']:.3f} ms vs in memory {ratio['in_memory_ms']:.3f} ms "
              f"(ratio {ratio['ratio']:.3f}); cold: open {epoch['open_s']:.2f} s + first epoch {epoch['epoch_s']:.2f} s; "
              f"fingerprint {fingerprint:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
