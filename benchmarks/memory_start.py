"""Peak memory of the start of training: ``wmse.splits.load_run_data`` on an image folder, from a warm decode
cache, in a fresh process per measurement (Linux: reads /proc/self/status).

For each ``--src LABEL=PATH`` (a ``src/`` directory of a wmse checkout: compare two commits in one run) a child
process first decodes the folder into its own cache (``--cache``/LABEL, not timed), then a second child imports
wmse, resets its peak RSS to its current RSS (``/proc/self/clear_refs``), runs ``load_run_data`` (preset
``folder-wmse2``: normalisation statistics of the folder, a 10% per-class held-out split) and reads its peak
RSS (VmHWM) again. The growth is set against the decoded pixels (N x C x S x S bytes): a run that holds one
copy of them grows by about 1x.

    python benchmarks/memory_start.py --folder DIR --resize 256 \\
        --src before=/tmp/wmse-base/src --src after=src --cache /tmp/memcache

Prints the CPU it ran on, a table, and writes benchmarks/results/memory_start.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from augment import cpu_info  # noqa: E402

WARM = """
import sys
from wmse.data import load
load("folder", "train", sys.argv[1], resize=int(sys.argv[2]) if sys.argv[2] != "none" else None)
"""

# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork (this script's, with torch imported).
MEASURE = """
import json, sys, time
from wmse.config import get_preset
from wmse.data import load
from wmse.splits import load_run_data

def status_mb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024

folder, resize = sys.argv[1], int(sys.argv[2]) if sys.argv[2] != "none" else None
cfg = get_preset("folder-wmse2").replace(data_dir=folder, resize=resize)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak restarts from the current RSS: the imports' transient peak does not hide growth
before = status_mb("VmRSS")
t0 = time.perf_counter()
data = load_run_data(cfg, log=lambda m: None)
seconds = time.perf_counter() - t0
peak, held = status_mb("VmHWM"), status_mb("VmRSS")
del data
ds = load("folder", "train", folder, resize=resize)  # a cache hit, after the peak was read: the decoded size
print(json.dumps({"images": len(ds), "shape": list(ds.images.shape[1:]), "decoded_mb": ds.images.numel() / 2**20,
                  "rss_before_mb": before, "peak_mb": peak, "held_mb": held, "seconds": seconds}))
"""


def child(src: str, code: str, args: list[str], cache: Path, limit_gb: float | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "WMSE_CACHE": str(cache)}

    def limit() -> None:  # a run that would take the machine's memory fails alone instead
        if limit_gb:
            import resource
            cap = int(limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          preexec_fn=limit)


def measure(label: str, src: str, args, cache_root: Path) -> dict:
    cache = cache_root / label
    argv = [str(args.folder), str(args.resize)]
    warm = child(src, WARM, argv, cache, None)
    if warm.returncode:
        raise SystemExit(f"{label}: decoding {args.folder} failed: {warm.stderr.strip().splitlines()[-1]}")
    run = child(src, MEASURE, argv, cache, args.limit_gb)
    if run.returncode:
        last = (run.stderr.strip().splitlines() or ["?"])[-1]
        return {"label": label, "src": src, "failed": f"exit {run.returncode}: {last}"}
    r = json.loads(run.stdout.strip().splitlines()[-1])
    r.update(label=label, src=src, growth_mb=r["peak_mb"] - r["rss_before_mb"])
    r["growth_x_decoded"] = r["growth_mb"] / r["decoded_mb"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, required=True, help="an image folder (class subfolders)")
    p.add_argument("--resize", default="256", help="--resize of the run (or 'none')")
    p.add_argument("--src", action="append", default=None,
                   help="LABEL=PATH of a wmse src/ directory (repeatable); default: this checkout's src")
    p.add_argument("--cache", type=Path, default=HERE / "results" / "memory_start_cache",
                   help="decode caches go to CACHE/LABEL")
    p.add_argument("--limit-gb", type=float, default=None, help="address-space limit of the measuring child")
    p.add_argument("--out", type=Path, default=HERE / "results" / "memory_start.json")
    args = p.parse_args()
    srcs = [s.split("=", 1) for s in (args.src or [f"this={HERE.parent / 'src'}"])]
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']} ({os.cpu_count()} cores), avx512_bf16: {'yes' if cpu['avx512_bf16'] else 'no'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = [measure(label, src, args, args.cache) for label, src in srcs]
    print(f"{'run':<10}{'images':>8}{'decoded MB':>12}{'peak MB':>10}{'growth MB':>11}{'growth/decoded':>16}"
          f"{'held MB':>9}{'seconds':>9}")
    for r in rows:
        if "failed" in r:
            print(f"{r['label']:<10}  {r['failed']}")
            continue
        print(f"{r['label']:<10}{r['images']:>8}{r['decoded_mb']:>12.0f}{r['peak_mb']:>10.0f}{r['growth_mb']:>11.0f}"
              f"{r['growth_x_decoded']:>15.2f}x{r['held_mb']:>9.0f}{r['seconds']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "folder": str(args.folder), "resize": args.resize,
                                    "load_average": os.getloadavg()[0], "runs": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
