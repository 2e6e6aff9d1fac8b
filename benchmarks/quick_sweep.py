"""Choose the `quick` preset's settings on a seeded held-out part of the Fashion-MNIST *training* images.

Every grid point runs as `wmse pretrain --preset quick ... --eval_split none --holdout H --seed S --final_eval
true`: pretraining and the classifiers use the rest of the training images, kNN / linear accuracy are scored
on the held-out part, and the test split is never read. The script checks each run's config.json and
final_eval.json say so, and refuses the result otherwise. The table is `wmse compare`'s; the winner is the
highest held-out kNN gain over the random-init encoder.

    .venv/bin/python benchmarks/quick_sweep.py --out /tmp/sweep --jobs 2         # the full grid: ~1 CPU-hour
    .venv/bin/python benchmarks/quick_sweep.py --out /tmp/sweep --grid lr        # one axis
    .venv/bin/python benchmarks/quick_sweep.py --out OUT --grid tiny -- --dataset folder --data_dir DIR ...

Results: OUT/sweep.json (settings, held-out accuracies, the winner) and OUT/compare/compare.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The settings the earlier (test-split) sweep varied, around the preset's values. The epoch count is not one
# of them: it is the preset's time budget (a few minutes on a 2-core CPU), and more epochs only help.
_AXES = {
    "lr": ["3e-3", "6e-3"],
    "w_size": ["64", "128"],
    "crop_scale": ["0.2,1", "0.4,1"],
}
GRIDS = {
    "full": [dict(zip(_AXES, values)) for values in itertools.product(*_AXES.values())],
    "lr": [{"lr": v} for v in ("2e-3", "3e-3", "6e-3", "1e-2")],
    "tiny": [{"lr": "1e-3"}, {"lr": "3e-3"}],  # for the test on tiny data
}


def run_name(point: dict) -> str:
    return "_".join(f"{k}={v}" for k, v in point.items()).replace(",", "-") or "preset"


def held_out_only(run: Path) -> str | None:
    """Why ``run`` was not scored on a held-out part of its training images (None when it was)."""
    cfg = json.loads((run / "config.json").read_text())
    if cfg.get("eval_split") is not None or cfg.get("eval_data_dir") is not None:
        return f"{run}: scored on {cfg.get('eval_split') or cfg.get('eval_data_dir')}, not a held-out part"
    note = json.loads((run / "final_eval.json").read_text()).get("note", "")
    if "held-out split of" not in note:
        return f"{run}: final_eval.json says {note!r}"
    return None


def pretrain(point: dict, args) -> Path:
    """One grid point; the held-out settings come last, so no extra argument can move scoring to the test split."""
    name = run_name(point)
    threads = ["--threads", str(max(1, (os.cpu_count() or 1) // args.jobs))] if args.jobs > 1 else []
    cmd = [sys.executable, "-m", "wmse", "pretrain", "--preset", "quick", *threads, *args.extra,
           *[a for k, v in point.items() for a in (f"--{k}", v)],
           "--out_dir", str(args.out), "--run_name", name, "--final_eval", "true",
           "--eval_split", "none", "--eval_data_dir", "none", "--holdout", str(args.holdout), "--seed", str(args.seed)]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (args.out / f"{name}.log").write_text(proc.stderr + proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    print(f"{name}: done in {(time.monotonic() - start) / 60:.1f} min", flush=True)
    return args.out / name


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data_dir", help="Fashion-MNIST folder (default: where the quick preset finds it)")
    p.add_argument("--grid", choices=sorted(GRIDS), default="full")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of each class held out for scoring")
    p.add_argument("--seed", type=int, default=0, help="seeds the held-out draw and the training")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores / jobs threads")
    p.add_argument("extra", nargs="*", help="more overrides for every run (after --)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(lambda point: pretrain(point, args), GRIDS[args.grid]))
    refused = [why for why in map(held_out_only, runs) if why]
    if refused:
        raise SystemExit("not scored on a held-out part: " + "; ".join(refused))
    from wmse.compare import compare_runs, format_markdown

    summaries, _ = compare_runs(runs, args.out / "compare", warn=lambda m: print(f"warning: {m}"))
    print(format_markdown(summaries))
    scored = [(s.gain("knn_top1"), point, s) for point, s in zip(GRIDS[args.grid], summaries)
              if s.gain("knn_top1") is not None]
    gain, best, summary = max(scored, key=lambda t: t[0])
    result = {"holdout": args.holdout, "seed": args.seed, "grid": args.grid, "winner": best,
              "winner_knn_gain": gain, "note": summary.final.get("note"),
              "rows": [{"settings": pt, "knn_top1": s.knn, "knn_gain": s.gain("knn_top1"),
                        "linear_gain": s.gain("linear_top1")} for pt, s in zip(GRIDS[args.grid], summaries)]}
    (args.out / "sweep.json").write_text(json.dumps(result, indent=2))
    print(f"winner (held-out kNN gain {gain:+.2f}): {best}")
    return result


if __name__ == "__main__":
    main()
