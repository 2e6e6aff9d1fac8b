"""Beyond RAM: an image folder whose decoded pixels exceed a memory limit decodes and trains inside it.

Makes (once, under --dir) --n JPEGs of 320 px upsampled from CIFAR-10 files with PIL (10 classes), then runs,
each inside its own cgroup-v1 memory limit (``/sys/fs/cgroup/memory/<name>``, memory.limit_in_bytes):

* ``decode``: ``load("folder", root, resize=256)`` in one process (builds the store), limit --limit_gb;
* ``train``: ``wmse pretrain`` on that folder (store already built) with ``--resize 256 --max_steps``,
  limit --limit_gb;
* ``train2``: the same with ``--nproc 2``, limit --limit2_gb.

For each: exit status, the cgroup's peak usage (memory.max_usage_in_bytes, page cache included), and the
peak RSS and PSS of each process (sampled from /proc/PID/smaps_rollup every 0.2 s), against the store's
size. PSS divides a page shared by K processes among them: the store's pages mapped by two ranks count
half in each. Needs root and cgroup v1 memory; otherwise it prints why and exits 0 (skipped).

    python benchmarks/memory.py                                   # 10,000 images, 1.5 GB / 2.5 GB
    python benchmarks/memory.py --only decode                     # the decode alone

Prints a table and writes benchmarks/results/memory.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from augment import CIFAR_DIR, cpu_info

CGROUP = Path("/sys/fs/cgroup/memory")


def make_folder(src: Path, dst: Path, n: int, side: int = 320) -> Path:
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    per = n // len(classes)
    for cls in classes:
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per):
            out = dst / cls / f"{i:05d}.jpg"
            if not out.exists():
                Image.open(src / cls / f"{i:04d}.jpg").convert("RGB").resize((side, side), Image.Resampling.BICUBIC) \
                    .save(out, quality=90)
    return dst


def skip_reason() -> str | None:
    if not (CGROUP / "memory.limit_in_bytes").exists():
        return f"{CGROUP} (cgroup v1 memory controller) is absent"
    if not os.access(CGROUP, os.W_OK):
        return f"{CGROUP} is not writable (needs root)"
    return None


def tree_pids(root: int) -> list[int]:
    """root and its descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        out.extend(frontier)
    return out


def rollup(pid: int) -> tuple[int, int, int, str] | None:
    """(RSS, PSS, anonymous PSS) in bytes and the command line of ``pid`` (PSS - anonymous PSS = mapped files,
    the store's pages among them)."""
    try:
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024
        name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80]
        return fields["Rss"], fields["Pss"], fields.get("Pss_Anon", 0), name
    except (OSError, KeyError, ValueError):
        return None


def run_limited(name: str, cmd: list[str], limit: int, env: dict) -> dict:
    group = CGROUP / f"wmse-bench-{name}-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        proc = subprocess.Popen(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peaks: dict[int, list] = {}
        t = time.perf_counter()
        while proc.poll() is None:
            for pid in tree_pids(proc.pid):
                r = rollup(pid)
                if r is not None and "python" in r[3]:
                    old = peaks.get(pid, [0, 0, 0, r[3]])
                    peaks[pid] = [max(old[0], r[0]), max(old[1], r[1]), max(old[2], r[2]), r[3]]
            time.sleep(0.2)
        err = proc.stderr.read()
        return {"status": proc.returncode, "seconds": time.perf_counter() - t, "limit": limit,
                "cgroup_peak": int((group / "memory.max_usage_in_bytes").read_text()),
                "processes": [{"pid": p, "peak_rss": v[0], "peak_pss": v[1], "peak_pss_anon": v[2], "cmd": v[3]}
                              for p, v in peaks.items()],
                "stderr_tail": err.strip().splitlines()[-3:]}
    finally:
        time.sleep(0.5)
        group.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", type=Path, default=CIFAR_DIR)
    ap.add_argument("--dir", type=Path, default=Path("/work/bigdata/data/memory-bench"))
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--limit_gb", type=float, default=1.5)
    ap.add_argument("--limit2_gb", type=float, default=2.5)
    ap.add_argument("--max_steps", type=int, default=3)
    ap.add_argument("--only", choices=["decode", "train", "train2"], action="append")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = ap.parse_args()
    reason = skip_reason() or (None if args.cifar.is_dir() else f"{args.cifar} is absent")
    if reason:
        print(f"skipped: {reason}")
        return
    folder = make_folder(args.cifar, args.dir / "images", args.n)
    env = {**os.environ, "WMSE_CACHE": str(args.dir / "cache"), "OMP_NUM_THREADS": "1"}
    py = sys.executable
    train = [py, "-m", "wmse", "pretrain", "--preset", "cifar10-quick", "--data_dir", str(folder), "--resize", "256",
             "--image_size", "64", "--arch", "small", "--batch_size", "64", "--w_size", "32", "--emb", "16",
             "--precision", "fp32", "--final_eval", "false", "--max_steps", str(args.max_steps),
             "--out_dir", str(args.dir / "runs")]
    jobs = {"decode": ([py, "-c", f"from wmse.data import load; print(load('folder', root={str(folder)!r}, resize=256))"],
                       args.limit_gb),
            "train": (train + ["--run_name", f"one-{os.getpid()}"], args.limit_gb),
            "train2": (train + ["--run_name", f"two-{os.getpid()}", "--nproc", "2"], args.limit2_gb)}
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']}, avx512_bf16: {cpu['avx512_bf16']}")
    out = {"cpu": cpu, "images": args.n}
    for name in args.only or list(jobs):
        cmd, gb = jobs[name]
        res = run_limited(name, cmd, int(gb * 2**30), env)
        stores = sorted((args.dir / "cache").glob("*.wstore"))
        res["store_bytes"] = stores[-1].stat().st_size if stores else None
        out[name] = res
        print(f"{name}: exit {res['status']} in {res['seconds']:.0f} s under {gb} GiB; cgroup peak "
              f"{res['cgroup_peak'] / 2**30:.2f} GiB; store {(res['store_bytes'] or 0) / 1e9:.2f} GB")
        for p in res["processes"]:
            print(f"   pid {p['pid']}: peak RSS {p['peak_rss'] / 2**30:.2f} GiB, peak PSS {p['peak_pss'] / 2**30:.2f} GiB"
                  f" (anonymous {p['peak_pss_anon'] / 2**30:.2f} GiB)  {p['cmd'][:60]}")
        if res["status"]:
            print("   " + " | ".join(res["stderr_tail"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
