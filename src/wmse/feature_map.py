"""A picture of what an encoder learned: a 2-D t-SNE map of the frozen features of held-out images, coloured
by class, for the trained encoder beside the same network at random initialisation (``wmse report``).

The random-init weights are the run's own when its checkpoint holds them (runs with ``final_eval``);
otherwise the method is built afresh after ``torch.manual_seed(seed)``, as ``wmse pretrain`` does before
building it. At most ``max_points`` images of the evaluation set are drawn (seeded), so the map takes seconds.
t-SNE comes from scikit-learn, the optional extra ``[report]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint import Checkpoint, read_checkpoint
from .methods import build_method
from .scoring import encode, make_eval_transform, subsample
from .splits import load_run_data
from .trained import load_run

__all__ = ["plot_feature_map", "tsne_2d", "SKLEARN_MISSING"]

SKLEARN_MISSING = "the feature map needs scikit-learn: pip install 'wmse[report]' (or pip install scikit-learn)"


def tsne_2d(features: torch.Tensor, seed: int) -> np.ndarray:
    """(n, D) features -> (n, 2) t-SNE coordinates (PCA to at most 50 dimensions first, as usual for t-SNE)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = features.double().numpy()
    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _initial_method(run, ckpt: Checkpoint):
    """The run's random-init method, and where its weights come from (for the panel's title)."""
    if ckpt.initial_method is not None:
        method = build_method(run.cfg, run.in_channels)
        method.load_state_dict(ckpt.initial_method)
        return method, "random init (the run's own, from its checkpoint)"
    torch.manual_seed(run.cfg.seed)
    return build_method(run.cfg, run.in_channels), f"random init (rebuilt with the run's seed {run.cfg.seed})"


def _final_knn(run_dir: Path) -> dict:
    try:
        final = json.loads((run_dir / "final_eval.json").read_text())
        return {k: v["knn_top1"] for k, v in final.items() if isinstance(v, dict) and v.get("knn_top1") is not None}
    except (OSError, ValueError, AttributeError):
        return {}


def plot_feature_map(run_dir: str | Path, path: Path, max_points: int = 2000, log=None) -> str | None:
    """Write the two-panel map to ``path``; a one-line reason instead (None when written) when it cannot be
    drawn: scikit-learn missing, no checkpoint, data without labels or not found."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return SKLEARN_MISSING
    run_dir = Path(run_dir)
    try:
        run = load_run(run_dir, "cpu")
        data = load_run_data(run.cfg, log=lambda m: None)
    except (FileNotFoundError, ValueError) as exc:
        return f"cannot load the run's encoder and data: {exc}"
    if data.eval_test_images is None:
        return "the run's data has no labels to colour by"
    images, labels = subsample(data.eval_test_images, data.eval_test_labels, max_points, run.cfg.seed)
    transform = make_eval_transform(run.cfg, run.mean or data.mean, run.std or data.std, torch.device("cpu"), False)
    initial, initial_title = _initial_method(run, read_checkpoint(run.checkpoint))
    knn = _final_knn(run_dir)
    panels = []
    for name, method, title in (("trained", run.method, f"trained encoder (epoch {run.epoch})"),
                                ("random_init", initial, initial_title)):
        feats = encode(method, images, transform, run.cfg, torch.device("cpu"))
        if not torch.isfinite(feats).all():
            return f"the {name} encoder's features are not finite"
        if name in knn:
            title += f"\nfinal kNN top-1 {knn[name]:.2f}%"
        panels.append((title, tsne_2d(feats, run.cfg.seed)))
    _draw(panels, labels.numpy(), data.train.classes, path, f"{run_dir.name}: t-SNE of E(x), {len(labels)} "
          f"evaluation images")
    return None


def _draw(panels, labels: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    axes = fig.subplots(1, len(panels))
    colors = [f"C{i % 10}" for i in range(max(len(classes), int(labels.max()) + 1))]
    for ax, (panel_title, xy) in zip(axes, panels):
        for c in np.unique(labels):
            sel = labels == c
            name = classes[c] if c < len(classes) else str(c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=colors[c], label=name, alpha=0.8, linewidths=0)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, markerscale=3, loc="best", ncol=1 if len(np.unique(labels)) <= 10 else 2)
    fig.suptitle(title, fontsize=11)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90)
