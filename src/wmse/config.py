"""Run configuration: one dataclass with every field of a pretraining run, plus named presets.

Every command of Table 1 of the paper (as published in the official repository
htdt/self-supervised) is a preset named ``{dataset}-{method}``, e.g. ``cifar10-wmse4``.
``quick`` (Fashion-MNIST on a CPU in minutes) and ``cifar10-quick`` are demos.

>>> cfg = apply_overrides(get_preset("cifar10-wmse2"), {"epochs": "10", "lr": "1e-3"})
>>> validate(cfg)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = [
    "Config",
    "PRESETS",
    "METHODS",
    "ARCHS",
    "DATASETS",
    "SCHEDULES",
    "WHITENINGS",
    "PRECISIONS",
    "apply_overrides",
    "describe_presets",
    "get_preset",
    "parse_value",
    "validate",
]

METHODS = ("wmse", "contrastive", "byol")
ARCHS = ("resnet18", "resnet34", "resnet50", "small")
DATASETS = ("cifar10", "cifar100", "stl10", "tiny_imagenet", "imagenet100", "fashion_mnist", "folder")
SCHEDULES = ("step", "cosine")
WHITENINGS = ("cholesky", "zca", "newton_schulz")
PRECISIONS = ("bf16", "fp32")


@dataclass
class Config:
    """Every setting of a pretraining run. Defaults are the official CIFAR-10 W-MSE 2 command."""

    # --- what to train
    method: str = "wmse"  # "wmse" | "contrastive" | "byol"
    dataset: str = "cifar10"  # a name of wmse.data (see DATASETS)
    data_dir: Optional[str] = None  # None -> $WMSE_DATA, else ~/.cache/wmse
    train_split: str = "train"  # split used for pretraining
    eval_split: Optional[str] = "test"  # None -> a held-out part of train_split (see holdout)
    clf_split: Optional[str] = None  # labelled split the kNN/linear probe fit on; None -> train_split
    holdout: float = 0.1  # fraction per class held out when eval_split is None
    preset: Optional[str] = None  # name of the preset this config came from (run names, logs)

    # --- model
    image_size: int = 32  # side of training crops; selects the ResNet stem
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | small
    emb: int = 64  # output size of the projection head
    head_hidden: int = 1024

    # --- method
    n_views: int = 2  # d: augmented views per image
    w_size: int = 128  # images per whitening slice (W-MSE)
    w_iter: int = 1  # repetitions of random slicing per step (W-MSE)
    w_eps: float = 0.0  # covariance shrinkage towards identity
    whitening: str = "cholesky"  # cholesky (paper) | zca | newton_schulz
    normalize: bool = True  # False: plain MSE / unnormalised logits (official --no_norm)
    temperature: float = 0.5  # NT-Xent temperature (official --tau)
    tau: float = 0.99  # BYOL initial EMA rate (official --byol_tau)
    predictor_hidden: int = 1024  # BYOL predictor hidden width (official: head_size)

    # --- optimisation (Adam)
    epochs: int = 1000
    batch_size: int = 512  # N images per step (global), each giving n_views views
    lr: float = 3e-3
    weight_decay: float = 1e-6
    warmup_iters: int = 500  # linear lr warm-up over the first iterations
    schedule: str = "step"  # "step": x lr_drop_factor at lr_drop_epochs; "cosine"
    lr_drop_epochs: Optional[tuple[int, ...]] = None  # None -> (epochs-50, epochs-25) clipped to >= 0
    lr_drop_factor: float = 0.2

    # --- augmentation (official defaults; wmse.augment.AugmentConfig takes its defaults from here)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.1
    flip_p: float = 0.5
    eval_resize: Optional[int] = None  # evaluation: resize shorter side to this, then centre-crop eval_size
    eval_size: Optional[int] = None  # None -> image_size

    # --- execution
    precision: str = "bf16"  # "bf16" autocast | "fp32"
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    threads: Optional[int] = None  # torch CPU threads; None -> torch's default
    sync_bn: bool = False  # DDP: synchronise BatchNorm statistics across processes
    whiten_global: bool = False  # DDP: whiten the gathered global batch instead of per-process slices

    # --- output, evaluation, checkpoints
    out_dir: str = "runs"
    run_name: Optional[str] = None  # None -> preset name + timestamp
    eval_every: int = 5  # epochs between kNN evaluations
    knn_k: int = 5
    eval_max_train: Optional[int] = 10000  # subsample of the kNN train set in periodic evaluations
    ckpt_every: int = 10  # epochs between checkpoints
    log_every: int = 50  # steps between training log lines
    max_steps: Optional[int] = None  # stop after this many steps (tests, demos)
    nonfinite_limit: int = 10  # abort after this many consecutive non-finite losses
    final_eval: bool = False  # at the end: kNN + linear probe, trained vs random-init encoder
    linear_epochs: int = 500

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`. Unknown keys raise ValueError; strings are parsed by field type."""
        hints = _field_types()
        unknown = sorted(set(d) - set(hints))
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(hints)}")
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in d.items()})

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (unknown names raise ValueError)."""
        hints = _field_types()
        for k in changes:
            if k not in hints:
                raise ValueError(f"unknown config field {k!r}; see `wmse presets --show NAME`")
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Parsing of command-line overrides by field type


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) of ``Optional[X]`` / ``X | None``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


_TRUE = {"yes", "true", "1", "on", "y"}
_FALSE = {"no", "false", "0", "off", "n"}
_NONE = {"none", "null", ""}


def _type_name(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        elem = args[0].__name__
        kind = f"comma-separated {elem}s" if args[-1] is Ellipsis else f"{len(args)} comma-separated {elem}s"
    else:
        kind = {bool: "a boolean (yes/no)", int: "an int", float: "a float", str: "a string"}[inner]
    return kind + (" or none" if optional else "")


def _parse_scalar(name: str, text: str, tp: type) -> Any:
    s = text.strip()
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ValueError(f"field {name!r} expects a boolean (yes/no/true/false/1/0), got {text!r}")
    if tp is str:
        return s
    try:
        return tp(s)
    except ValueError:
        article = "an" if tp is int else "a"
        raise ValueError(f"field {name!r} expects {article} {tp.__name__}, got {text!r}") from None


def parse_value(name: str, text: str) -> Any:
    """Parse the command-line string ``text`` for the field ``name`` according to its type.

    ints, floats, bools (yes/no/true/false/1/0), strings, ``none`` for optional fields, and
    comma-separated tuples such as ``"0.2,1.0"``.
    """
    hints = _field_types()
    if name not in hints:
        raise ValueError(f"unknown config field {name!r}; see `wmse presets --show NAME`")
    tp, optional = _strip_optional(hints[name])
    if optional and text.strip().lower() in _NONE:
        return None
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        parts = [p for p in text.replace(" ", "").split(",") if p != ""]
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not variadic and len(parts) != len(args):
            raise ValueError(f"field {name!r} expects {_type_name(tp)}, got {text!r}")
        elem = args[0]
        try:
            return tuple(elem(p) for p in parts)
        except ValueError:
            raise ValueError(f"field {name!r} expects {_type_name(tp)}, got {text!r}") from None
    return _parse_scalar(name, text, tp)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Bring a value read from JSON (lists, ints for floats, strings) to the field's type."""
    if isinstance(value, str):
        inner, _ = _strip_optional(tp)
        return value if inner is str else parse_value(name, value)
    if isinstance(value, list):
        return tuple(value)
    inner, _ = _strip_optional(tp)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
    """``cfg`` with fields replaced by command-line strings, e.g. ``{"lr": "1e-3", "crop_scale": "0.2,1"}``.

    Raises ValueError naming the field for unknown fields and unparsable values.
    """
    changes = {name: parse_value(name, text) for name, text in overrides.items()}
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"field {name!r} must be in [{lo}, {hi}], got {value}")


def _check_min(name: str, value: Optional[float], lo: float) -> None:
    if value is not None and value < lo:
        raise ValueError(f"field {name!r} must be >= {lo}, got {value}")


def _validate_wmse(cfg: Config) -> None:
    if cfg.w_size > cfg.batch_size:
        raise ValueError(
            f"w_size ({cfg.w_size}) is larger than batch_size ({cfg.batch_size}); "
            "use w_size <= batch_size (a whitening slice takes w_size images of one batch)"
        )
    if cfg.batch_size % cfg.w_size != 0:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be a multiple of w_size ({cfg.w_size}); "
            f"e.g. batch_size={max(1, cfg.batch_size // cfg.w_size) * cfg.w_size}"
        )
    if cfg.w_size <= cfg.emb:
        raise ValueError(
            f"w_size ({cfg.w_size}) must be larger than emb ({cfg.emb}) or the covariance is singular; "
            f"w_size >= 2*emb ({2 * cfg.emb}) is recommended"
        )
    _check_min("w_iter", cfg.w_iter, 1)
    if not 0.0 <= cfg.w_eps < 1.0:
        raise ValueError(f"field 'w_eps' must be in [0, 1), got {cfg.w_eps}")


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
        _check_range(name, getattr(cfg, name), 0.0, 1.0)
    _check_min("eval_resize", cfg.eval_resize, 1)
    _check_min("eval_size", cfg.eval_size, 1)
    if cfg.eval_resize is not None and cfg.eval_size is not None and cfg.eval_resize < cfg.eval_size:
        raise ValueError(
            f"eval_resize ({cfg.eval_resize}) is smaller than eval_size ({cfg.eval_size}); "
            "the centre crop must fit in the resized image"
        )


def _validate_splits(cfg: Config) -> None:
    # Imported here: the data package is heavier than this module and not needed to build a config.
    from .data import SPLITS

    known = SPLITS.get(cfg.dataset, ())
    for name in ("train_split", "eval_split", "clf_split"):
        value = getattr(cfg, name)
        if value is not None and value not in known:
            none_hint = " or none (held-out part of train_split)" if name == "eval_split" else ""
            raise ValueError(
                f"field {name!r}: dataset {cfg.dataset!r} has no split {value!r}; "
                f"choose one of {', '.join(known)}{none_hint}"
            )


def validate(cfg: Config) -> None:
    """Raise ValueError (naming the field and the fix) for impossible or unknown settings."""
    _check_choice("method", cfg.method, METHODS)
    _check_choice("arch", cfg.arch, ARCHS)
    _check_choice("dataset", cfg.dataset, DATASETS)
    _validate_splits(cfg)
    _check_choice("schedule", cfg.schedule, SCHEDULES)
    _check_choice("whitening", cfg.whitening, WHITENINGS)
    _check_choice("precision", cfg.precision, PRECISIONS)
    for name in ("epochs", "batch_size", "emb", "head_hidden", "predictor_hidden", "image_size"):
        _check_min(name, getattr(cfg, name), 1)
    for name in ("eval_every", "knn_k", "ckpt_every", "log_every", "linear_epochs", "nonfinite_limit"):
        _check_min(name, getattr(cfg, name), 1)
    for name in ("max_steps", "eval_max_train", "threads"):
        _check_min(name, getattr(cfg, name), 1)
    _check_min("warmup_iters", cfg.warmup_iters, 0)
    _check_min("weight_decay", cfg.weight_decay, 0.0)
    if cfg.n_views < 2:
        raise ValueError(f"n_views must be >= 2 (views of one image are the positives), got {cfg.n_views}")
    if cfg.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm needs 2 samples), got {cfg.batch_size}")
    if cfg.lr <= 0:
        raise ValueError(f"field 'lr' must be > 0, got {cfg.lr}")
    if cfg.method == "wmse":
        _validate_wmse(cfg)
    if cfg.method == "contrastive" and cfg.temperature <= 0:
        raise ValueError(f"field 'temperature' must be > 0, got {cfg.temperature}")
    if cfg.method == "byol":
        _check_range("tau", cfg.tau, 0.0, 1.0)
    if not 0.0 < cfg.lr_drop_factor <= 1.0:
        raise ValueError(f"field 'lr_drop_factor' must be in (0, 1], got {cfg.lr_drop_factor}")
    if cfg.lr_drop_epochs is not None and any(e < 0 for e in cfg.lr_drop_epochs):
        raise ValueError(f"field 'lr_drop_epochs' must be epochs >= 0, got {cfg.lr_drop_epochs}")
    if cfg.eval_split is None and not 0.0 < cfg.holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1) when eval_split is none, got {cfg.holdout}")
    _validate_augment(cfg)


# ---------------------------------------------------------------------------------------------
# Presets: Table 1 of the paper, as the official README's commands (htdt/self-supervised).
# Official flags -> fields: --bs batch_size, --num_samples n_views, --epoch epochs, --emb emb,
# --w_size w_size, --w_iter w_iter, --lr lr, --crop_s0 crop_scale[0], --cj0..3 jitter, --gs_p
# grayscale_p. Unstated official defaults: bs 512, num_samples 2, w_size 128, w_iter 1,
# w_eps 0, head 1024, tau (temperature) 0.5, byol_tau 0.99, adam_l2 1e-6, drop (50, 25) x0.2,
# 500 warm-up iterations, crop scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.1.

# Per dataset: what the official dataset modules fix (crop size, eval transform, splits).
_DATASET_BASE: dict[str, dict[str, Any]] = {
    "cifar10": dict(dataset="cifar10", image_size=32, emb=64, w_size=128, lr=3e-3, epochs=1000),
    "cifar100": dict(dataset="cifar100", image_size=32, emb=64, w_size=128, lr=3e-3, epochs=1000),
    # STL-10: pretrain on train+unlabeled at 64 px; probes fit on train, eval Resize(70)+CenterCrop(64).
    "stl10": dict(
        dataset="stl10", image_size=64, emb=128, w_size=256, lr=2e-3, epochs=2000,
        train_split="train+unlabeled", clf_split="train", eval_resize=70, eval_size=64,
    ),
    # Tiny ImageNet: 64 px; the test split has no labels, so evaluation uses val.
    "tiny_imagenet": dict(
        dataset="tiny_imagenet", image_size=64, emb=128, w_size=256, lr=2e-3, epochs=1000, eval_split="val",
    ),
    # ImageNet-100: 224 px (standard stem), stronger augmentation. The official code evaluates on a
    # copy of the images resized to 224 px; Resize(256) + CenterCrop(224) is the usual equivalent.
    "imagenet100": dict(
        dataset="imagenet100", image_size=224, emb=128, w_size=256, lr=2e-3, epochs=240, eval_split="val",
        eval_resize=256, eval_size=224, crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), grayscale_p=0.2,
    ),
}

# Per method: the flags of each official command beyond the dataset's.
_METHOD_FLAGS: dict[str, dict[str, Any]] = {
    "wmse2": dict(method="wmse", n_views=2, batch_size=512),
    "wmse4": dict(method="wmse", n_views=4, batch_size=256),
    "contrastive": dict(method="contrastive", n_views=2, batch_size=512),
    "byol": dict(method="byol", n_views=2, batch_size=512),
}

# The official command each Table 1 preset reproduces (shown by `wmse presets`).
OFFICIAL_COMMANDS: dict[str, str] = {
    "cifar10-wmse4": "--dataset cifar10 --epoch 1000 --lr 3e-3 --num_samples 4 --bs 256 --emb 64 --w_size 128",
    "cifar100-wmse4": "--dataset cifar100 --epoch 1000 --lr 3e-3 --num_samples 4 --bs 256 --emb 64 --w_size 128",
    "stl10-wmse4": "--dataset stl10 --epoch 2000 --lr 2e-3 --num_samples 4 --bs 256 --emb 128 --w_size 256",
    "tiny_imagenet-wmse4": "--dataset tiny_in --epoch 1000 --lr 2e-3 --num_samples 4 --bs 256 --emb 128 --w_size 256",
    "cifar10-wmse2": "--dataset cifar10 --epoch 1000 --lr 3e-3 --emb 64 --w_size 128",
    "cifar100-wmse2": "--dataset cifar100 --epoch 1000 --lr 3e-3 --emb 64 --w_size 128",
    "stl10-wmse2": "--dataset stl10 --epoch 2000 --lr 2e-3 --emb 128 --w_size 256 --w_iter 4",
    "tiny_imagenet-wmse2": "--dataset tiny_in --epoch 1000 --lr 2e-3 --emb 128 --w_size 256 --w_iter 4",
    "cifar10-contrastive": "--dataset cifar10 --epoch 1000 --lr 3e-3 --emb 64 --method contrastive",
    "cifar100-contrastive": "--dataset cifar100 --epoch 1000 --lr 3e-3 --emb 64 --method contrastive",
    "stl10-contrastive": "--dataset stl10 --epoch 2000 --lr 2e-3 --emb 128 --method contrastive",
    "tiny_imagenet-contrastive": "--dataset tiny_in --epoch 1000 --lr 2e-3 --emb 128 --method contrastive",
    "cifar10-byol": "--dataset cifar10 --epoch 1000 --lr 3e-3 --emb 64 --method byol",
    "cifar100-byol": "--dataset cifar100 --epoch 1000 --lr 3e-3 --emb 64 --method byol",
    "stl10-byol": "--dataset stl10 --epoch 2000 --lr 2e-3 --emb 128 --method byol",
    "tiny_imagenet-byol": "--dataset tiny_in --epoch 1000 --lr 2e-3 --emb 128 --method byol",
    "imagenet100-wmse2": (
        "--dataset imagenet --epoch 240 --lr 2e-3 --emb 128 --w_size 256 "
        "--crop_s0 0.08 --cj0 0.8 --cj1 0.8 --cj2 0.8 --cj3 0.2 --gs_p 0.2"
    ),
    "imagenet100-wmse4": (
        "--dataset imagenet --epoch 240 --lr 2e-3 --num_samples 4 --bs 256 --emb 128 --w_size 256 "
        "--crop_s0 0.08 --cj0 0.8 --cj1 0.8 --cj2 0.8 --cj3 0.2 --gs_p 0.2"
    ),
}

# Flags of single commands that differ from their dataset/method defaults.
_EXTRA_FLAGS: dict[str, dict[str, Any]] = {
    "stl10-wmse2": dict(w_iter=4),  # --w_iter 4
    "tiny_imagenet-wmse2": dict(w_iter=4),  # --w_iter 4
}


def _table1_presets() -> dict[str, Config]:
    presets: dict[str, Config] = {}
    for name in OFFICIAL_COMMANDS:
        dataset, method = name.split("-")
        fields = {**_DATASET_BASE[dataset], **_METHOD_FLAGS[method], **_EXTRA_FLAGS.get(name, {})}
        presets[name] = Config(preset=name, **fields)
    return presets


# quick: the README's demo. Fashion-MNIST (Debian's files, 1 channel, 28 px) with the small conv
# net on a 2-core CPU. fp32 because CPUs without native bf16 run bf16 convolutions >10x slower.
# Cosine schedule: the step schedule's drops at E-50/E-25 would fall at epoch 0 of a short run.
# Measured (busy 2-core machine; kNN k=5 on the test split, random init 80.3 %):
#   1 epoch, batch 256, lr 2e-3, crop (0.2, 1): 82.7 %    1 epoch, batch 128, lr 3e-3: 83.3 %
#   2 epochs, batch 128, lr 3e-3, crop (0.2, 1): 84.0 %   same with crop (0.4, 1): 84.8 %
# Milder crops than the official (0.2, 1): a 20 % crop of a 28 px garment loses its silhouette.
# Full test-set kNN gain over random init, batch 128, crop (0.4, 1) (CPU = this 2-core machine,
# deterministic; GPU = an H200, benchmarks/results/h200/quick_sweep.log):
#   3 epochs, lr 3e-3, w_size 64: +4.70 (CPU), +4.66 / +4.62 (GPU, seeds 0 / 1)
#   3 epochs, w_size 128: +4.92 (GPU); lr 6e-3: +5.17 / +4.43; lr 6e-3, w_size 128: +5.11 (GPU)
#   4 epochs, lr 3e-3, w_size 64: +4.85 (CPU)
#   4 epochs, lr 6e-3, w_size 128 (this preset): +5.39 / +5.25 (CPU, seeds 0 / 1; 8 min 56 s / 8 min 16 s);
#   after the faster augmentation (its arithmetic rounds differently): +5.46 / +5.09, 6 min 42 s / 7 min 36 s
# w_size 128 = the whole batch: one better-estimated covariance per view instead of two.
_QUICK = Config(
    preset="quick",
    dataset="fashion_mnist", arch="small", image_size=28, emb=32, w_size=128, batch_size=128,
    epochs=4, lr=6e-3, warmup_iters=50, schedule="cosine",
    crop_scale=(0.4, 1.0), grayscale_p=0.0,  # one channel: grayscale is the identity
    precision="fp32", channels_last=True, eval_every=1, ckpt_every=1, log_every=20,
    final_eval=True, linear_epochs=100, eval_split="test",
)

# cifar10-quick: the CIFAR-10 JPEG folder (`--data-dir .../cifar10-jpeg/train`, no test split,
# so 10% per class is held out), ResNet-18 at 32 px, a 20-epoch cosine run for a single GPU.
_CIFAR10_QUICK = Config(
    preset="cifar10-quick",
    dataset="folder", eval_split=None, holdout=0.1, arch="resnet18", image_size=32, emb=64, w_size=128,
    batch_size=512, epochs=20, lr=3e-3, warmup_iters=200, schedule="cosine", eval_every=5, ckpt_every=5,
    final_eval=True, linear_epochs=100,
)

PRESETS: dict[str, Config] = {**_table1_presets(), "quick": _QUICK, "cifar10-quick": _CIFAR10_QUICK}


def get_preset(name: str) -> Config:
    """The preset ``name`` (a fresh copy). Unknown names raise ValueError listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def describe_presets() -> str:
    """A plain-text table of every preset's main hyperparameters (for ``wmse presets``)."""
    cols = ("preset", "method", "dataset", "arch", "size", "d", "bs", "emb", "w_size", "w_iter", "lr", "epochs")
    rows = [cols]
    for name, c in PRESETS.items():
        wmse = c.method == "wmse"
        rows.append((
            name, c.method, c.dataset, c.arch, str(c.image_size), str(c.n_views), str(c.batch_size),
            str(c.emb), str(c.w_size) if wmse else "-", str(c.w_iter) if wmse else "-", f"{c.lr:g}", str(c.epochs),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("Table 1 presets reproduce the official commands of htdt/self-supervised (python -m train ...);")
    lines.append("Every field can be overridden on the command line; `wmse presets --show NAME` prints them all.")
    return "\n".join(lines)
