"""``wmse compare RUN...``: one table of several runs (printed, and written as Markdown and CSV) and one
plot of every run's kNN accuracy against epochs and against training minutes.

Each run is read by :func:`read_run` alone: ``config.json``, ``metrics.jsonl`` (through
:func:`wmse.progress.read_jsonl`) and ``final_eval.json``. A file that is broken is a one-line warning naming
it, and the run is compared with what remains; the other runs are unaffected.

Accuracies are comparable only on one evaluation set. A run's evaluation set is named by its dataset (and
data folder for image folders), its eval split, or its held-out fraction and seed, or its
``eval_data_dir``. When the runs span several sets, the table says so, gives each set a letter, and ranks
runs only within their own set.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .progress import read_jsonl

__all__ = ["RunSummary", "read_run", "find_runs", "compare_runs", "format_markdown"]

_RUN_FILES = ("config.json", "metrics.jsonl", "final_eval.json")
COLUMNS = ("run", "method", "preset", "dataset", "eval set", "encoder", "epochs", "train min", "kNN",
           "kNN gain", "linear", "linear gain", "rank")


@dataclass
class RunSummary:
    """What the table and the plot show of one run. Accuracies in percent; None where not measured."""

    path: Path
    config: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    curve: list[tuple[int, float | None, float]] = field(default_factory=list)  # (epoch, minutes, kNN)
    epochs: int | None = None
    train_minutes: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def _final(self, encoder: str, key: str) -> float | None:
        part = self.final.get(encoder)
        value = part.get(key) if isinstance(part, dict) else None
        return float(value) if _num(value) else None

    @property
    def knn(self) -> float | None:
        """The final kNN accuracy, else the last kNN monitor value (see :attr:`knn_from_monitor`)."""
        final = self._final("trained", "knn_top1")
        return final if final is not None else (self.curve[-1][2] if self.curve else None)

    @property
    def knn_from_monitor(self) -> bool:
        return self._final("trained", "knn_top1") is None and bool(self.curve)

    def gain(self, key: str) -> float | None:
        trained, random = self._final("trained", key), self._final("random_init", key)
        return trained - random if trained is not None and random is not None else None

    @property
    def eval_set(self) -> str:
        """What this run was scored on (runs with equal strings are comparable)."""
        c = self.config
        if not c:
            return self.final.get("note") or "unknown (no config.json)"
        if c.get("eval_data_dir"):
            where = f"eval_data_dir {c['eval_data_dir']}"
        elif c.get("eval_split") is None:
            where = f"held-out {c.get('holdout')} of {c.get('train_split')}, seed {c.get('seed')}"
        else:
            where = str(c["eval_split"])
        if c.get("clf_split"):
            where += f" (classifiers on {c['clf_split']})"
        if c.get("dataset") == "folder":  # the folder is the data
            where += f" [{c.get('data_dir')}]"
        return where


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path, warnings: list[str]) -> dict:
    """A JSON object file, or {} with a warning when it is missing-but-expected or broken."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.append(f"{path}: unreadable ({str(exc).splitlines()[0]}); compared without it")
        return {}
    if not isinstance(data, dict):
        warnings.append(f"{path}: not a JSON object; compared without it")
        return {}
    return data


def read_run(path: str | Path) -> RunSummary:
    """One run directory's config.json, metrics.jsonl and final_eval.json (each optional)."""
    run = RunSummary(Path(path))
    run.config = _read_json(run.path / "config.json", run.warnings)
    run.final = _read_json(run.path / "final_eval.json", run.warnings)
    try:
        records, bad = read_jsonl(run.path / "metrics.jsonl")
    except OSError as exc:
        records, bad = [], 0
        run.warnings.append(f"{run.path / 'metrics.jsonl'}: unreadable ({exc.strerror or exc}); compared without it")
    if bad:
        run.warnings.append(f"{run.path / 'metrics.jsonl'}: {bad} unreadable line(s) skipped")
    seconds = [r["seconds"] for r in records if r.get("kind") == "epoch" and _num(r.get("seconds"))]
    epochs = [r["epoch"] for r in records if r.get("kind") == "epoch" and _num(r.get("epoch"))]
    run.epochs = int(max(epochs)) if epochs else None
    run.train_minutes = sum(seconds) / 60 if seconds else None
    run.curve = [(int(r["epoch"]), float(r["minutes"]) if _num(r.get("minutes")) else None, float(r["knn_top1"]))
                 for r in records if r.get("kind") == "eval" and _num(r.get("epoch")) and _num(r.get("knn_top1"))]
    return run


def _is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in _RUN_FILES)


def find_runs(paths: list[str | Path], warn) -> list[Path]:
    """Run directories among ``paths``: each a run, or a folder whose subfolders are runs (others skipped)."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            warn(f"{p}: no such directory; skipped")
        elif _is_run(p):
            runs.append(p)
        else:
            found = sorted(d for d in p.iterdir() if d.is_dir() and _is_run(d))
            if not found:
                warn(f"{p}: neither a run directory nor a folder of runs (no {', '.join(_RUN_FILES)}); skipped")
            runs.extend(found)
    return runs


def _set_letters(runs: list[RunSummary]) -> dict[str, str]:
    """Evaluation set -> its letter (A, B, ...) in order of first appearance (empty when all runs share one)."""
    sets = list(dict.fromkeys(map(_set_of, runs)))
    return {s: chr(ord("A") + i) if i < 26 else str(i) for i, s in enumerate(sets)} if len(sets) > 1 else {}


def _set_of(run: RunSummary) -> str:
    return f"{run.config.get('dataset', '?')}: {run.eval_set}"


def _ranks(runs: list[RunSummary]) -> dict[str, int]:
    """Run path -> its rank by kNN accuracy among the runs scored on the same evaluation set (equal accuracies
    share a rank: 1 + the number of runs of the set that score higher)."""
    scored = [r for r in runs if r.knn is not None]
    return {str(r.path): 1 + sum(o.knn > r.knn for o in scored if _set_of(o) == _set_of(r)) for r in scored}


def _pct(v: float | None, signed: bool = False) -> str:
    return "" if v is None else f"{v:+.2f}" if signed else f"{v:.2f}"


def table_rows(runs: list[RunSummary]) -> list[dict[str, str]]:
    """One dict per run, keyed by :data:`COLUMNS`, values as shown (a kNN from the monitor ends in " (m)")."""
    letters, ranks = _set_letters(runs), _ranks(runs)
    rows = []
    for r in runs:
        c, s = r.config, _set_of(r)
        planned = c.get("epochs")
        rows.append({
            "run": r.name, "method": str(c.get("method", "")), "preset": str(c.get("preset") or ""),
            "dataset": str(c.get("dataset", "")),
            "eval set": (f"{letters[s]}: " if letters else "") + r.eval_set,
            "encoder": str(c.get("arch", "")),
            "epochs": "" if r.epochs is None else f"{r.epochs}" + (f"/{planned}" if _num(planned) else ""),
            "train min": "" if r.train_minutes is None else f"{r.train_minutes:.2f}",
            "kNN": _pct(r.knn) + (" (m)" if r.knn_from_monitor else ""),
            "kNN gain": _pct(r.gain("knn_top1"), True), "linear": _pct(r._final("trained", "linear_top1")),
            "linear gain": _pct(r.gain("linear_top1"), True),
            "rank": (f"{letters[s]}{ranks[str(r.path)]}" if letters else str(ranks[str(r.path)]))
            if str(r.path) in ranks else "",
        })
    return rows


def _footnotes(runs: list[RunSummary]) -> list[str]:
    notes = ["kNN and linear: top-1 % of the final evaluation; gain: over the same encoder at random init; "
             "(m): no final evaluation, the last kNN monitor value (on at most eval_max_train images)"]
    letters = _set_letters(runs)
    if letters:
        notes.append(f"WARNING: these runs are scored on {len(letters)} different evaluation sets; accuracies "
                     "are comparable only within one set (rank is within the set): "
                     + "; ".join(f"{letter} = {s}" for s, letter in letters.items()))
    return notes


def format_markdown(runs: list[RunSummary]) -> str:
    rows = table_rows(runs)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines + [""] + _footnotes(runs)) + "\n"


def format_csv(runs: list[RunSummary]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS) + ["path"], lineterminator="\n")
    writer.writeheader()
    for r, row in zip(runs, table_rows(runs)):
        writer.writerow({**row, "path": str(r.path)})
    return buf.getvalue()


def plot_runs(runs: list[RunSummary], path: Path) -> bool:
    """kNN accuracy against epochs (left) and training minutes (right), a line per run, the final kNN as a
    star. False (nothing written) when no run has a kNN value."""
    if not any(r.curve or r.knn is not None for r in runs):
        return False
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_ep, ax_min = fig.subplots(1, 2, sharey=True)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        final = run._final("trained", "knn_top1")
        for ax, x in ((ax_ep, 0), (ax_min, 1)):
            pts = [(p[x], p[2]) for p in run.curve if p[x] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=color, label=run.name)
            if final is not None and pts:
                ax.plot([pts[-1][0]], [final], marker="*", ms=11, ls="", color=color)
    ax_ep.set_xlabel("epoch")
    ax_min.set_xlabel("training minutes (evaluations included)")
    ax_ep.set_ylabel("kNN top-1 (%)")
    ax_ep.set_title("kNN monitor against epochs (star: final kNN)")
    ax_min.set_title("against training minutes")
    for ax in (ax_ep, ax_min):
        ax.grid(alpha=0.3)
    ax_ep.legend(fontsize=8, loc="lower right")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return True


def compare_runs(paths: list[str | Path], out_dir: str | Path | None = None, warn=print) -> tuple[list[RunSummary], dict[str, Path]]:
    """Read the runs under ``paths``; write compare.md, compare.csv and compare.png into ``out_dir``
    (default: ``compare/`` beside the runs, i.e. in their common parent folder).

    Raises FileNotFoundError when no run is found.
    """
    skipped: list[str] = []
    found = find_runs(paths, skipped.append)
    if not found:
        raise FileNotFoundError(f"no run directories among {', '.join(map(str, paths))} "
                                f"(a run holds {' / '.join(_RUN_FILES)})")
    runs = [read_run(p) for p in found]
    for w in skipped + [w for r in runs for w in r.warnings]:
        warn(w)
    out = Path(out_dir) if out_dir else _common_parent(found) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "compare.md", "csv": out / "compare.csv"}
    files["markdown"].write_text(format_markdown(runs))
    files["csv"].write_text(format_csv(runs))
    if plot_runs(runs, out / "compare.png"):
        files["plot"] = out / "compare.png"
    else:
        warn("no run has a kNN value: compare.png not written")
    return runs, files


def _common_parent(paths: list[Path]) -> Path:
    parents = [p.resolve().parent for p in paths]
    common = parents[0]
    while not all(common == p or common in p.parents for p in parents):
        common = common.parent
    return common
