"""A method's frozen encoder scored on a run's data: features, the periodic kNN monitor with embedding
diagnostics, and the final comparison of the trained encoder with its random initialisation."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from .augment import check_eval_crop, eval_transform
from .config import Config
from .data.loader import ImageView, as_view
from .diagnostics import embedding_diagnostics, nonfinite_rows
from .evaluate import extract_features, knn_accuracy, linear_probe
from .methods import Method
from .splits import RunData

__all__ = ["make_eval_transform", "encode", "subsample", "knn_monitor", "diagnostics_record", "final_evaluation",
           "format_final", "check_eval_fits"]


def make_eval_transform(cfg: Config, mean, std, device: torch.device, channels_last: bool) -> Callable[[Tensor], Tensor]:
    """uint8 batch -> normalised float batch on ``device``: optional resize, centre crop, no augmentation."""
    size = cfg.eval_size or cfg.image_size

    def transform(images: Tensor) -> Tensor:
        x = eval_transform(images.to(device, non_blocking=True), size, mean, std, resize=cfg.eval_resize)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    return transform


def check_eval_fits(cfg: Config, data: RunData) -> None:
    """ValueError, before the first step, when the evaluation's centre crop does not fit the images it will be
    applied to (the periodic kNN, the final evaluation, ``wmse embed`` of the training images)."""
    size = cfg.eval_size or cfg.image_size
    for images in (data.train.images, data.eval_train_images, data.eval_test_images):
        if images is not None:
            check_eval_crop(size, int(images.shape[2]), int(images.shape[3]), cfg.eval_resize)


def encode(method: Method, images: Tensor | ImageView, transform, cfg: Config, device: torch.device,
           head: bool = False) -> Tensor:
    """Frozen features of uint8 images (eval mode, no augmentation), float32 on the CPU, gathered and
    transformed batch by batch."""
    was_training = method.training
    method.eval()
    try:
        fn = (lambda x: method.features(x, head=True)) if head else method.features
        return extract_features(fn, images, transform, batch_size=512, device=device,
                                autocast=cfg.precision == "bf16")
    finally:
        method.train(was_training)


def subsample(images: Tensor | ImageView, labels: Tensor, n: int | None, seed: int) -> tuple[ImageView, Tensor]:
    """At most ``n`` (images, labels), drawn with a generator of ``seed`` (all of them when n is None); the
    images as an index view of ``images``, no pixel copied."""
    if n is None or n >= len(labels):
        return as_view(images), labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return as_view(images).take(idx), labels[idx]


def _nonfinite(*features: Tensor) -> dict:
    """{"nonfinite_features": rows} when any of ``features`` has non-finite rows (a diverged encoder), else {}."""
    bad = sum(nonfinite_rows(f) for f in features)
    return {"nonfinite_features": bad} if bad else {}


def knn_monitor(method: Method, data: RunData, cfg: Config, device: torch.device, transform) -> dict:
    """Cheap kNN accuracy in percent (k = cfg.knn_k) on at most cfg.eval_max_train training images.

    ``{"knn_top1": None, "nonfinite_features": rows}`` when the encoder's features are not finite.
    """
    tr_x, tr_y = subsample(data.eval_train_images, data.eval_train_labels, cfg.eval_max_train, cfg.seed)
    te_x, te_y = subsample(data.eval_test_images, data.eval_test_labels, cfg.eval_max_train, cfg.seed + 1)
    f_tr = encode(method, tr_x, transform, cfg, device)
    f_te = encode(method, te_x, transform, cfg, device)
    bad = _nonfinite(f_tr, f_te)
    if bad:
        return {"knn_top1": None, **bad}
    return {"knn_top1": knn_accuracy(f_tr, tr_y, f_te, te_y, k=cfg.knn_k)}


def diagnostics_record(method: Method, data: RunData, cfg: Config, device: torch.device, transform) -> dict:
    """Spectrum / effective rank / collapse indicators of the features and head embeddings of up to 2048
    evaluation images, as JSON-ready values (non-finite sets counted instead, see embedding_diagnostics)."""
    images, _ = subsample(data.eval_test_images, data.eval_test_labels, 2048, cfg.seed + 2)
    feats = encode(method, images, transform, cfg, device)
    # The head on the features already computed (eval mode), rather than a second backbone pass.
    was_training = method.training
    method.eval()
    with torch.no_grad():
        embs = method.head(feats.to(device)).float().cpu()
    method.train(was_training)
    diag = embedding_diagnostics(feats, embs)
    return {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in diag.items()}


def final_evaluation(method: Method, initial_state: dict, data: RunData, cfg: Config, device, transform, log) -> dict:
    """kNN + linear probe (percentages) of the trained encoder and of the same encoder at its random init."""
    results = {}
    trained_state = copy.deepcopy(method.state_dict())
    for name, state in (("random_init", initial_state), ("trained", trained_state)):
        method.load_state_dict(state)
        f_tr = encode(method, data.eval_train_images, transform, cfg, device)
        f_te = encode(method, data.eval_test_images, transform, cfg, device)
        bad = _nonfinite(f_tr, f_te)
        if bad:
            results[name] = {"knn_top1": None, "linear_top1": None, "linear_top5": None, **bad}
            log(f"final eval [{name}]: {bad['nonfinite_features']} feature rows are not finite: not scored")
            continue
        knn = knn_accuracy(f_tr, data.eval_train_labels, f_te, data.eval_test_labels, k=cfg.knn_k)
        lin = linear_probe(f_tr, data.eval_train_labels, f_te, data.eval_test_labels, epochs=cfg.linear_epochs,
                           seed=cfg.seed, device=device)
        results[name] = {"knn_top1": knn, "linear_top1": lin["top1"], "linear_top5": lin["top5"]}
        log(f"final eval [{name}]: kNN(k={cfg.knn_k}) {knn:.2f}%  linear top-1 {lin['top1']:.2f}%")
    method.load_state_dict(trained_state)
    return results


def format_final(results: dict, note: str) -> str:
    """The final comparison as a small text table."""
    rows = [f"{'encoder':<14}{'kNN top-1':>11}{'linear top-1':>14}{'linear top-5':>14}"]
    for name, r in results.items():
        if r["knn_top1"] is None:
            rows.append(f"{name:<14}{'features not finite':>39}")
            continue
        rows.append(f"{name:<14}{r['knn_top1']:>10.2f}%{r['linear_top1']:>13.2f}%{r['linear_top5']:>13.2f}%")
    if all(results.get(n, {}).get("knn_top1") is not None for n in ("trained", "random_init")):
        gain = results["trained"]["knn_top1"] - results["random_init"]["knn_top1"]
        rows.append(f"kNN gain over random init: {gain:+.2f} points")
    rows.append(f"({note})")
    return "\n".join(rows)
