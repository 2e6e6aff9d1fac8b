"""The training loop's batch gather: from a copied training split (what a held-out run gathered from before index
views) against an index view of the whole set, in memory and on a read-only memory map (warm page cache).

Each sample runs whole epochs (until 200 batches or 1 s) of ``wmse.data.loader.BatchLoader`` (random batches
of ``--batch`` images, the permutation of the loop) over the 90% of the images a ``--holdout 0.1`` run trains
on; the cases are interleaved and repeated, and the median and the best per-batch time are set against the
copy's, in the same run (the best is the steadier figure on a machine shared with other jobs).

    python benchmarks/gather.py                       # CIFAR size (50,000 x 32 px) and 256 px (1,500 images)
    python benchmarks/gather.py --threads 1 --repeats 7

Prints the CPU it ran on, a table, and writes benchmarks/results/gather.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from wmse.data import split_per_class
from wmse.data.loader import BatchLoader, ImageView

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from augment import cpu_info  # noqa: E402


def mapped_copy(x: torch.Tensor, folder: Path) -> torch.Tensor:
    """``x`` written to a file and mapped back read-only (its pages stay in the page cache: warm)."""
    path = folder / f"images_{x.shape[-1]}.u8"
    x.numpy().tofile(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # not writable: a view never writes
        return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(x.shape)))


def seconds_per_batch(loader: BatchLoader, first_epoch: int) -> tuple[float, int]:
    """Whole epochs from ``first_epoch`` until 200 batches or 1 s (one sample; steadier than one short epoch on
    a busy machine): (seconds per batch, epochs run)."""
    t0, n, epoch = time.perf_counter(), 0, first_epoch
    while n < 200 and time.perf_counter() - t0 < 1.0:
        for _ in loader.epoch(epoch):
            n += 1
        epoch += 1
    return (time.perf_counter() - t0) / n, epoch - first_epoch


def bench(n: int, side: int, batch: int, repeats: int, folder: Path) -> dict:
    base = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8)
    labels = torch.arange(n) % 10
    kept, _ = split_per_class(labels, 0.1, seed=0)
    loaders = {
        "copy": BatchLoader(base[kept].contiguous(), batch, seed=0),
        "view": BatchLoader(ImageView(base, kept), batch, seed=0),
        "view of a memory map": BatchLoader(ImageView(mapped_copy(base, folder), kept), batch, seed=0),
    }
    first = [x for x, _ in loaders["copy"].epoch(0)]
    for name, loader in loaders.items():  # the same batches, pixel for pixel, and a warm-up pass
        assert all(torch.equal(a, b) for a, (b, _) in zip(first, loader.epoch(0))), name
    times = {name: [] for name in loaders}
    for r in range(repeats):
        for name, loader in loaders.items():
            times[name].append(seconds_per_batch(loader, 1 + 1000 * r)[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    return {"images": n, "side": side, "batch": batch, "batches_per_epoch": len(loaders["copy"]),
            "ms_per_batch": {k: 1e3 * v for k, v in med.items()},
            "ratio_to_copy": {k: v / med["copy"] for k, v in med.items()},
            "best_ms_per_batch": {k: 1e3 * v for k, v in best.items()},
            "best_ratio_to_copy": {k: v / best["copy"] for k, v in best.items()},
            "all_ms_per_batch": {k: [1e3 * t for t in v] for k, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n32", type=int, default=50_000, help="images of the 32 px case")
    p.add_argument("--n256", type=int, default=1_500, help="images of the 256 px case (0: skip)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "gather.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']} ({os.cpu_count()} cores), avx512_bf16: {'yes' if cpu['avx512_bf16'] else 'no'}; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, side in ((args.n32, 32), (args.n256, 256)):
            if n:
                rows.append(bench(n, side, args.batch, args.repeats, Path(tmp)))
    print(f"{'images':>8}{'side':>6}  {'case':<22}{'median ms/batch':>16}{'x copy':>8}"
          f"{'best ms/batch':>14}{'x copy':>8}")
    for r in rows:
        for case, ms in r["ms_per_batch"].items():
            print(f"{r['images']:>8}{r['side']:>6}  {case:<22}{ms:>16.2f}{r['ratio_to_copy'][case]:>8.2f}"
                  f"{r['best_ms_per_batch'][case]:>14.2f}{r['best_ratio_to_copy'][case]:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "torch_threads": torch.get_num_threads(),
                                    "load_average": os.getloadavg()[0], "cases": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
