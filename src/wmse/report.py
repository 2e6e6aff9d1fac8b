"""``wmse report RUN``: PNG plots of a run and an index.html that shows them.

Reads (all optional, but at least one must exist):

- ``RUN/config.json``: the resolved config, shown as a table;
- ``RUN/metrics.jsonl``: records with ``"kind"``: ``"train"`` (step, epoch, loss, lr),
  ``"eval"`` (epoch, step, knn_top1, ...), ``"diagnostics"`` (epoch, spectrum_features,
  spectrum_embeddings, feature_eff_rank, ...);
- ``RUN/eval.json`` and ``RUN/eval_head.json``: final results of ``wmse evaluate``.

Writes ``RUN/report/loss_lr.png``, ``knn.png``, ``spectrum.png``, ``features.png`` (a t-SNE map of the
trained and random-init encoders' features, :mod:`wmse.feature_map`; needs the run's checkpoint and data)
and ``index.html``. A plot whose
data is missing is skipped, and the page says why. Plots use matplotlib's Agg canvas directly
(no pyplot), so they work without a display and leave the global backend alone.
"""

from __future__ import annotations

import html
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .diagnostics import effective_rank
from .evaluate import flatten
from .fileio import remove_orphans, write_atomic, write_text_atomic
from .progress import read_jsonl

__all__ = ["write_report"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or delete it and rerun") from exc
    return data if isinstance(data, dict) else {"value": data}


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _save(fig: Figure, path: Path) -> None:
    """The figure as a PNG, atomically: a full disk leaves the previous file (or none), names ``path``."""
    FigureCanvasAgg(fig)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what is there)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot_loss_lr(train: list[dict], path: Path) -> str | None:
    """Loss (raw and smoothed) and learning rate against the step. None if no data."""
    pts = [(r["step"], r["loss"]) for r in train if _num(r.get("step")) and _num(r.get("loss"))]
    lrs = [(r["step"], r["lr"]) for r in train if _num(r.get("step")) and _num(r.get("lr"))]
    if not pts:
        return "no train records with step and loss in metrics.jsonl"
    fig = Figure(figsize=(8, 6), layout="constrained")
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    steps, losses = zip(*pts)
    window = max(1, len(losses) // 50)
    ax_loss.plot(steps, losses, color=_COLORS[0], alpha=0.35 if window > 1 else 1, lw=0.8,
                 label="loss")
    if window > 1:
        ax_loss.plot(steps, _smooth(list(losses), window), color=_COLORS[0], lw=1.8,
                     label=f"loss, moving average of {window}")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss and learning rate")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")
    if lrs:
        ax_lr.plot(*zip(*lrs), color=_COLORS[1], lw=1.5)
    else:
        ax_lr.text(0.5, 0.5, "no lr logged", ha="center", va="center", transform=ax_lr.transAxes)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    _save(fig, path)
    return None


def _accuracy_keys(records: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if _num(v) and ("top1" in k or "top5" in k or k.endswith("acc")) and k not in keys:
                keys.append(k)
    return keys


def _plot_knn(evals: list[dict], final: dict | None, path: Path, x: str = "epoch") -> str | None:
    """Monitored accuracies against the epoch (or the training minutes, ``x="minutes"``), with the final
    results as dashed lines."""
    keys = _accuracy_keys(evals)
    if not keys or not any(_num(r.get(x)) for r in evals):
        return f"no eval records with {x} and an accuracy (knn_top1, ...) in metrics.jsonl"
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, key in enumerate(keys):
        pts = [(r[x], r[key]) for r in evals if _num(r.get(x)) and _num(r.get(key))]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, color=_COLORS[i % len(_COLORS)], label=key)
    for j, (name, val) in enumerate(_final_lines(final)):
        ax.axhline(val, ls="--", lw=1, color=_COLORS[(len(keys) + j) % len(_COLORS)],
                   label=f"final {name}: {val:.2f}")
    ax.set_xlabel("training minutes (evaluations included)" if x == "minutes" else x)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy during pretraining" + (" against wall time" if x == "minutes" else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    return None


def _final_lines(final: dict | None) -> list[tuple[str, float]]:
    """Top-1 accuracies of eval.json (kNN, weighted kNN, linear) for reference lines."""
    if not final:
        return []
    out = []
    for name in ("knn", "weighted_knn", "linear"):
        part = final.get(name)
        if isinstance(part, Mapping) and _num(part.get("top1")):
            out.append((f"{name} top1", float(part["top1"])))
    return out


def _positive_share(spec: list) -> tuple[list[int], list[float]]:
    vals = [float(v) for v in spec if _num(v)]
    total = sum(v for v in vals if v > 0)
    pts = [(i + 1, v / total) for i, v in enumerate(vals) if v > 0] if total > 0 else []
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def _effective_rank(spec: list) -> float | None:
    """:func:`wmse.diagnostics.effective_rank` of a logged spectrum (its non-numbers left out);
    None when no eigenvalue is positive, where the measure is undefined."""
    vals = [float(v) for v in spec if _num(v)]
    if not any(v > 0 for v in vals):
        return None
    return effective_rank(torch.tensor(vals, dtype=torch.float64))


def _plot_spectrum(diags: list[dict], final: dict | None, path: Path) -> str | None:
    """Normalised covariance spectra (first and last record) and effective rank over epochs."""
    with_spec = [d for d in diags if d.get("spectrum_features") or d.get("spectrum_embeddings")]
    if not with_spec and final and isinstance(final.get("diagnostics"), Mapping):
        if final["diagnostics"].get("spectrum_features"):
            with_spec = [{"epoch": final.get("epoch", "final"), **final["diagnostics"]}]
    if not with_spec:
        return "no diagnostics records with spectra in metrics.jsonl (nor in eval.json)"
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_spec, ax_rank = fig.subplots(1, 2)
    for color, key, label in ((_COLORS[0], "spectrum_features", "features E(x)"),
                              (_COLORS[1], "spectrum_embeddings", "embeddings g(E(x))")):
        first, last = with_spec[0], with_spec[-1]
        for rec, style, alpha in ((first, "--", 0.5), (last, "-", 1.0)):
            if rec is first and first is last:
                continue
            xs, ys = _positive_share(rec.get(key) or [])
            if xs:
                ax_spec.plot(xs, ys, style, color=color, alpha=alpha,
                             label=f"{label}, epoch {rec.get('epoch', '?')}")
        ranks = [(d["epoch"], _effective_rank(d.get(key) or [])) for d in with_spec
                 if _num(d.get("epoch"))]
        ranks = [(e, r) for e, r in ranks if r is not None]
        if ranks:
            ax_rank.plot(*zip(*ranks), marker="o", ms=3, color=color, label=label)
    ax_spec.set_yscale("log")
    ax_spec.set_xscale("log")
    ax_spec.set_xlabel("eigenvalue index")
    ax_spec.set_ylabel("eigenvalue / sum of eigenvalues")
    ax_spec.set_title("covariance spectrum")
    ax_spec.grid(alpha=0.3, which="both")
    ax_spec.legend(fontsize=8)
    ax_rank.set_xlabel("epoch")
    ax_rank.set_ylabel("effective rank")
    ax_rank.set_title("effective rank (Roy & Vetterli)")
    ax_rank.grid(alpha=0.3)
    if ax_rank.lines:
        ax_rank.legend(fontsize=8)
    else:
        ax_rank.text(0.5, 0.5, "one record only", ha="center", va="center",
                     transform=ax_rank.transAxes)
    _save(fig, path)
    return None



def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if v != 0 and abs(v) < 0.1 else f"{v:.2f}" if abs(v) < 1e6 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) > 8 and all(_num(x) for x in v):
            return f"[{len(v)} values]"
        return json.dumps(v)
    return str(v)


def _table(d: Mapping) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in flatten(d, lists=True)
    )
    return f"<table>{rows}</table>"


_CSS = """body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:2px 8px;
text-align:left;font-size:14px}th{background:#f4f4f4;font-weight:normal}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}.note{color:#a33}"""


def _feature_map(run: Path, path: Path, log) -> str:
    """features.png (:mod:`wmse.feature_map`) when the run has a checkpoint; the reason it is skipped
    otherwise (scikit-learn missing: said on ``log`` too, with the command that installs it)."""
    if not (run / "checkpoints" / "last.pt").is_file():
        return "no checkpoint in RUN/checkpoints: no encoder to map"
    from .feature_map import SKLEARN_MISSING, plot_feature_map

    note = plot_feature_map(run, path)
    if note == SKLEARN_MISSING:
        log(f"note: {note}")
    return note


def write_report(run_dir: str | Path, feature_map: bool = True, log=None) -> Path:
    """Write ``RUN/report/{loss_lr,knn,spectrum,features}.png`` and ``RUN/report/index.html``.

    Args:
        run_dir: a run directory (written by ``wmse pretrain`` and/or ``wmse evaluate``).
        feature_map: draw features.png, the t-SNE map of trained and random-init features (needs the
            checkpoint, the run's data and scikit-learn; skipped with a note otherwise).
        log: where the one-line notes go (default: stderr).

    Returns:
        The path of ``index.html``.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds none of config.json,
            metrics.jsonl, eval.json.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist: pass the RUN folder of a "
                                "`wmse pretrain` run (it holds config.json and metrics.jsonl)")
    config = _read_json(run / "config.json")
    records, bad = read_jsonl(run / "metrics.jsonl")
    finals = {name: _read_json(run / f"{name}.json") for name in ("eval", "eval_head")}
    if config is None and not records and not any(finals.values()):
        raise FileNotFoundError(f"{run} holds no config.json, metrics.jsonl or eval.json: "
                                "is it a run directory of `wmse pretrain`?")
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    for folder in (run, out):
        remove_orphans(folder)  # temporaries of writers that died (safe beside a live one: see fileio)
    by_kind: dict[str, list[dict]] = {}
    for rec in records:
        by_kind.setdefault(str(rec.get("kind")), []).append(rec)
    plots = {
        "loss_lr.png": _plot_loss_lr(by_kind.get("train", []), out / "loss_lr.png"),
        "knn.png": _plot_knn(by_kind.get("eval", []), finals["eval"], out / "knn.png"),
        "knn_minutes.png": _plot_knn(by_kind.get("eval", []), finals["eval"], out / "knn_minutes.png", "minutes"),
        "spectrum.png": _plot_spectrum(by_kind.get("diagnostics", []), finals["eval"],
                                       out / "spectrum.png"),
    }
    if feature_map:
        plots["features.png"] = _feature_map(run, out / "features.png", log or _stderr)
    index = out / "index.html"
    write_text_atomic(index, _html(run, config, by_kind, finals, plots, bad))
    return index


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _html(run: Path, config: dict | None, by_kind: dict, finals: dict, plots: dict,
          bad_lines: int) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>wmse report: "
             f"{html.escape(run.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>wmse run {html.escape(run.name)}</h1>"]
    parts.append("<h2>Final metrics</h2>")
    shown = False
    for name, final in finals.items():
        if final:
            shown = True
            parts.append(f"<h3>{name}.json</h3>{_table(final)}")
    if not shown:
        parts.append("<p class='note'>no eval.json: run <code>wmse evaluate RUN</code> for the "
                     "final kNN and linear-probe results.</p>")
    last = {}
    for kind in ("train", "eval", "diagnostics"):
        if by_kind.get(kind):
            last[kind] = {k: v for k, v in by_kind[kind][-1].items()
                          if k != "kind" and not isinstance(v, list)}
    if last:
        parts.append(f"<h3>last logged values</h3>{_table(last)}")
    parts.append("<h2>Plots</h2>")
    for name, note in plots.items():
        if note is None:
            parts.append(f"<p><img src='{name}' alt='{name}'></p>")
        else:
            parts.append(f"<p class='note'>{name} skipped: {html.escape(note)}</p>")
    if bad_lines:
        parts.append(f"<p class='note'>{bad_lines} unreadable line(s) in metrics.jsonl were "
                     "skipped (a run interrupted while writing?)</p>")
    parts.append("<h2>Config</h2>")
    parts.append(_table(config) if config else "<p class='note'>no config.json in the run</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
