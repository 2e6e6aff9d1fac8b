"""Validation of a run configuration: impossible or unknown settings raise ValueError naming the field
and the fix. Names are checked against the registries (methods, architectures, datasets); each method
checks its own fields (``Method.validate_config``)."""

from __future__ import annotations

from ..checks import check_choice, check_min, check_range
from .schema import Config

__all__ = ["validate", "PRECISIONS"]

PRECISIONS = ("bf16", "fp32")


def _validate_augment(cfg: Config) -> None:
    lo, hi = cfg.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"field 'crop_scale' must satisfy 0 < min <= max <= 1, got {cfg.crop_scale}")
    lo, hi = cfg.crop_ratio
    if not 0.0 < lo <= hi:
        raise ValueError(f"field 'crop_ratio' must satisfy 0 < min <= max, got {cfg.crop_ratio}")
    if any(j < 0 for j in cfg.jitter) or cfg.jitter[3] > 0.5:
        raise ValueError(f"field 'jitter' needs non-negative strengths and hue <= 0.5, got {cfg.jitter}")
    for name in ("jitter_p", "grayscale_p", "flip_p"):
        check_range(name, getattr(cfg, name), 0.0, 1.0)
    check_min("eval_resize", cfg.eval_resize, 1)
    check_min("eval_size", cfg.eval_size, 1)
    if cfg.eval_resize is not None and cfg.eval_size is not None and cfg.eval_resize < cfg.eval_size:
        raise ValueError(
            f"eval_resize ({cfg.eval_resize}) is smaller than eval_size ({cfg.eval_size}); "
            "the centre crop must fit in the resized image"
        )


def _validate_splits(cfg: Config) -> None:
    from ..data import SPLITS

    known = SPLITS.get(cfg.dataset, ())
    for name in ("train_split", "eval_split", "clf_split"):
        value = getattr(cfg, name)
        if value is not None and value not in known:
            none_hint = " or none (held-out part of train_split)" if name == "eval_split" else ""
            raise ValueError(
                f"field {name!r}: dataset {cfg.dataset!r} has no split {value!r}; "
                f"choose one of {', '.join(known)}{none_hint}"
            )


def _validate_optimisation(cfg: Config) -> None:
    from ..schedule import SCHEDULES

    check_choice("schedule", cfg.schedule, SCHEDULES)
    check_min("warmup_iters", cfg.warmup_iters, 0)
    check_min("weight_decay", cfg.weight_decay, 0.0)
    if cfg.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm needs 2 samples), got {cfg.batch_size}")
    if cfg.lr <= 0:
        raise ValueError(f"field 'lr' must be > 0, got {cfg.lr}")
    if not 0.0 < cfg.lr_drop_factor <= 1.0:
        raise ValueError(f"field 'lr_drop_factor' must be in (0, 1], got {cfg.lr_drop_factor}")
    if cfg.lr_drop_epochs is not None and any(e < 0 for e in cfg.lr_drop_epochs):
        raise ValueError(f"field 'lr_drop_epochs' must be epochs >= 0, got {cfg.lr_drop_epochs}")


def validate(cfg: Config) -> None:
    """Raise ValueError (naming the field and the fix) for impossible or unknown settings."""
    from ..data import available
    from ..methods import METHODS
    from ..models import ARCHS

    check_choice("method", cfg.method, METHODS.names())
    check_choice("arch", cfg.arch, ARCHS.names())
    check_choice("dataset", cfg.dataset, available())
    _validate_splits(cfg)
    check_choice("precision", cfg.precision, PRECISIONS)
    for name in ("epochs", "batch_size", "emb", "head_hidden", "image_size"):
        check_min(name, getattr(cfg, name), 1)
    for name in ("eval_every", "knn_k", "ckpt_every", "log_every", "linear_epochs", "nonfinite_limit"):
        check_min(name, getattr(cfg, name), 1)
    for name in ("max_steps", "eval_max_train", "threads"):
        check_min(name, getattr(cfg, name), 1)
    if cfg.n_views < 2:
        raise ValueError(f"n_views must be >= 2 (views of one image are the positives), got {cfg.n_views}")
    _validate_optimisation(cfg)
    METHODS[cfg.method].validate_config(cfg)
    if cfg.eval_split is None and not 0.0 < cfg.holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1) when eval_split is none, got {cfg.holdout}")
    _validate_augment(cfg)
