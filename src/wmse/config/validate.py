"""Validation of a run configuration: impossible or unknown settings raise ValueError naming the field
and the fix. Names are checked against the registries (methods, architectures, datasets); each method
checks its own fields (``Method.validate_config``)."""

from __future__ import annotations

import math

from ..augment import check_eval_crop, validate_recipe
from ..checks import check_choice, check_min, check_range
from .schema import Config, all_fields

__all__ = ["validate", "PRECISIONS"]

PRECISIONS = ("bf16", "fp32")


def _validate_augment(cfg: Config) -> None:
    validate_recipe(cfg.crop_scale, cfg.crop_ratio, cfg.jitter, cfg.jitter_p, cfg.grayscale_p, cfg.flip_p,
                    cfg.solarize_p)
    check_min("eval_resize", cfg.eval_resize, 1)
    check_min("eval_size", cfg.eval_size, 1)
    if cfg.eval_resize is not None and cfg.eval_size is not None and cfg.eval_resize < cfg.eval_size:
        raise ValueError(
            f"eval_resize ({cfg.eval_resize}) is smaller than eval_size ({cfg.eval_size}); "
            "the centre crop must fit in the resized image"
        )
    crop = cfg.eval_size or cfg.image_size
    if cfg.resize is not None and crop is not None:  # --resize makes every image resize x resize at load time
        try:
            check_eval_crop(crop, cfg.resize, cfg.resize, cfg.eval_resize)
        except ValueError as err:
            raise ValueError(f"{err} (resize={cfg.resize} makes the images {cfg.resize}x{cfg.resize})") from None


def _validate_splits(cfg: Config) -> None:
    from ..data import DATASETS

    known = DATASETS[cfg.dataset].splits
    for name in ("train_split", "eval_split", "clf_split"):
        value = getattr(cfg, name)
        if value is not None and value not in known:
            none_hint = " or none (held-out part of train_split)" if name == "eval_split" else ""
            raise ValueError(
                f"field {name!r}: dataset {cfg.dataset!r} has no split {value!r}; "
                f"choose one of {', '.join(known)}{none_hint}"
            )


def _validate_optimisation(cfg: Config) -> None:
    from ..optim import DEVICE_SKIP, OPTIMIZERS
    from ..schedule import SCHEDULES

    check_choice("optimizer", cfg.optimizer, OPTIMIZERS.names())
    check_range("momentum", cfg.momentum, 0.0, 1.0)
    check_choice("schedule", cfg.schedule, SCHEDULES)
    check_range("lr_end_factor", cfg.lr_end_factor, 0.0, 1.0)
    if cfg.sync_every is not None and cfg.sync_every > 1 and cfg.optimizer not in DEVICE_SKIP:
        raise ValueError(f"sync_every > 1 skips non-finite steps with fused Adam's device-side skip; optimizer "
                         f"{cfg.optimizer!r} has none: use --sync_every 1")
    check_min("warmup_iters", cfg.warmup_iters, 0)
    check_min("weight_decay", cfg.weight_decay, 0.0)
    if cfg.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm needs 2 samples), got {cfg.batch_size}")
    if cfg.lr <= 0:
        raise ValueError(f"field 'lr' must be > 0, got {cfg.lr}")
    if cfg.lr > 1e36:  # Adam's first step is 10 * lr, applied in float32 (largest value ~3.4e38)
        raise ValueError(f"field 'lr' must be at most 1e36 (updates are computed in float32), got {cfg.lr}")
    if not 0.0 < cfg.lr_drop_factor <= 1.0:
        raise ValueError(f"field 'lr_drop_factor' must be in (0, 1], got {cfg.lr_drop_factor}")
    if cfg.lr_drop_epochs is not None and any(e < 0 for e in cfg.lr_drop_epochs):
        raise ValueError(f"field 'lr_drop_epochs' must be epochs >= 0, got {cfg.lr_drop_epochs}")


def _validate_finite(cfg: Config) -> None:
    """No NaN or infinity in any float field (``--lr nan`` would pass every range check)."""
    for name in all_fields():
        value = getattr(cfg, name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"field {name!r} must be a finite number, got {value}")


def _validate_data(cfg: Config) -> None:
    from ..data import DATASETS

    check_choice("dataset", cfg.dataset, DATASETS.names())
    _validate_splits(cfg)
    spec = DATASETS[cfg.dataset]
    check_min("resize", cfg.resize, 1)
    if cfg.resize is not None and not spec.image_files:
        files = ", ".join(n for n, s in DATASETS.items() if s.image_files)
        raise ValueError(f"field 'resize' applies to datasets of image files ({files}), not {cfg.dataset!r}: "
                         "its images all have one size already")
    if cfg.eval_data_dir is not None:
        if cfg.dataset != "folder":
            raise ValueError(f"field 'eval_data_dir' names a test folder or archive of a 'folder' dataset; "
                             f"{cfg.dataset!r} has named splits: use --eval_split")
        if cfg.eval_split is not None:
            raise ValueError("give either eval_data_dir (a test folder or archive) or eval_split, not both")
    if cfg.eval_split is None and cfg.eval_data_dir is None and not 0.0 < cfg.holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1) when eval_split is none, got {cfg.holdout}")


def validate(cfg: Config) -> None:
    """Raise ValueError (naming the field and the fix) for impossible or unknown settings."""
    from ..methods import METHODS
    from ..models import ARCHS, parse_arch_kwargs

    _validate_finite(cfg)
    check_choice("method", cfg.method, METHODS.names())
    ARCHS.check(cfg.arch)
    if parse_arch_kwargs(cfg.arch_kwargs) and ARCHS[cfg.arch].family is None:
        raise ValueError(f"field 'arch_kwargs' applies to timm:NAME and torchvision:NAME archs, not {cfg.arch!r}")
    _validate_data(cfg)
    check_choice("precision", cfg.precision, PRECISIONS)
    for name in ("epochs", "batch_size", "emb", "head_hidden", "head_layers", "image_size"):
        check_min(name, getattr(cfg, name), 1)
    for name in ("eval_every", "knn_k", "ckpt_every", "log_every", "linear_epochs", "nonfinite_limit"):
        check_min(name, getattr(cfg, name), 1)
    for name in ("max_steps", "eval_max_train", "threads", "sync_every", "augment_batches"):
        check_min(name, getattr(cfg, name), 1)
    if cfg.eval_max_train is not None and cfg.eval_max_train < cfg.knn_k:
        raise ValueError(f"eval_max_train ({cfg.eval_max_train}) is below knn_k ({cfg.knn_k}): the periodic kNN "
                         "needs at least knn_k training images")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise ValueError(f"field 'max_minutes' must be > 0, got {cfg.max_minutes}")
    if cfg.ckpt_minutes is not None and cfg.ckpt_minutes <= 0:
        raise ValueError(f"field 'ckpt_minutes' must be > 0 (or none), got {cfg.ckpt_minutes}")
    if cfg.n_views < 2:
        raise ValueError(f"n_views must be >= 2 (views of one image are the positives), got {cfg.n_views}")
    _validate_optimisation(cfg)
    METHODS[cfg.method].validate_config(cfg)
    _validate_augment(cfg)
