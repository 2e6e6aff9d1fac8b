"""Every method of wmse under one protocol: the same preset (data, network, optimizer, schedule, epochs), only
the method and the fields it needs changed; kNN and linear accuracy against the same encoder at random init.

    .venv/bin/python benchmarks/family.py --preset quick --out /tmp/family       # CPU: Fashion-MNIST, ~1 h
    python benchmarks/family.py --preset cifar10-quick --data_dir DIR --out OUT  # GPU: CIFAR-10, short budget

Each method runs as `wmse pretrain --preset PRESET --method NAME ...` in its own process. The table is
`wmse compare`'s (printed, and OUT/compare/compare.md, .csv and .png); benchmarks/results/family_<preset>.json
(family_<preset>_<names>.json with --only) holds the accuracies and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

# What each method changes in the shared preset (quick: emb 32, batch 128). W-MSE 4: four views of half the
# images, as Table 1 of the paper (the same views per step). CW-RGP and Shuffled-DBN: the authors' ratio of
# group size to slice size (CW-RGP: 128 channels against 64 images; DBN: groups of 32 channels).
METHODS = {
    "wmse2": ["--method", "wmse"],
    "wmse4": ["--method", "wmse", "--n_views", "4", "--batch_size", "{half_batch}", "--w_size", "{half_batch}"],
    "contrastive": ["--method", "contrastive"],
    "byol": ["--method", "byol"],
    "cwrgp": ["--method", "cwrgp", "--cw_groups", "1", "--w_size", "{emb_half}"],
    "intl": ["--method", "intl"],
    "dbn": ["--method", "dbn", "--dbn_groups", "1"],
    "vicreg": ["--method", "vicreg"],
    "barlow": ["--method", "barlow"],
}


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        return f"{model} ({'avx512_bf16' if 'avx512_bf16' in info else 'no avx512_bf16'})"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def run(name: str, args, out: Path) -> dict:
    from wmse.config import get_preset

    base = get_preset(args.preset)
    fill = {"half_batch": str(base.batch_size // 2), "emb_half": str(base.emb // 2)}
    extra = [a.format(**fill) for a in METHODS[name]]
    cmd = [sys.executable, "-m", "wmse", "pretrain", "--preset", args.preset, *extra, "--out_dir", str(out),
           "--run_name", name, "--final_eval", "true", "--seed", str(args.seed), *args.extra]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out / f"{name}.log").write_text(proc.stderr + proc.stdout)
    if proc.returncode != 0:
        return {"method": name, "error": proc.stderr.strip().splitlines()[-1], "seconds": seconds, "args": extra}
    final = json.loads((out / name / "final_eval.json").read_text())
    return {"method": name, "args": extra, "seconds": seconds, **{k: final[k] for k in ("trained", "random_init")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--data_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="a subset of " + ", ".join(METHODS))
    p.add_argument("extra", nargs="*", help="more overrides for every run (after --)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()}; preset {args.preset}", flush=True)
    rows = []
    for name in args.only or METHODS:
        row = run(name, args, out)
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    name = f"family_{args.preset}" + (f"_{'_'.join(args.only)}" if args.only else "")
    (results / f"{name}.json").write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=2))
    ok = [out / r["method"] for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"{r['method']}: error: {r['error']}")
    if ok:  # the table of `wmse compare` (compare.md / .csv / .png in OUT/compare)
        from wmse.compare import compare_runs, format_markdown

        runs, files = compare_runs(ok, out / "compare", warn=lambda m: print(f"warning: {m}"))
        print("\n" + format_markdown(runs) + f"(also in {files['markdown']}, {files['csv']})")


if __name__ == "__main__":
    main()
