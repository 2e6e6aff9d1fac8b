"""Named configurations: every command of Table 1 of the paper (as published in the official repository
htdt/self-supervised) is a preset named ``{dataset}-{method}``, e.g. ``cifar10-wmse4``; ``quick``
(Fashion-MNIST on a CPU in minutes) and ``cifar10-quick`` are demos.

>>> cfg = apply_overrides(get_preset("cifar10-wmse2"), {"epochs": "10", "lr": "1e-3"})
"""

from __future__ import annotations

from typing import Any

from .fields import fields_of
from .schema import Config

__all__ = ["PRESETS", "OFFICIAL_COMMANDS", "get_preset", "describe_presets"]


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
# Milder crops than the official (0.2, 1): a 20 % crop of a 28 px garment loses its silhouette.
# w_size 128 = the whole batch: one better-estimated covariance per view instead of two.
# The sweep that chose these settings is in benchmarks/README.md ("The quick preset").
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
    return PRESETS[name].replace()


def _method_options(cfg: Config) -> str:
    """The preset's values of its method's own fields, e.g. "w_size=128 w_iter=1"."""
    from ..methods import METHODS

    names = [f.name for f in fields_of(METHODS[cfg.method].Options, cfg.method)]
    return " ".join(f"{n}={getattr(cfg, n)}" for n in names if n in _SHOWN_OPTIONS)


# Method fields worth a column in `wmse presets` (the rest: `wmse presets --show NAME`).
_SHOWN_OPTIONS = ("w_size", "w_iter", "temperature", "tau")


def describe_presets() -> str:
    """A plain-text table of every preset's main hyperparameters (for ``wmse presets``)."""
    cols = ("preset", "method", "dataset", "arch", "size", "d", "bs", "emb", "lr", "epochs", "method options")
    rows = [cols]
    for name, c in PRESETS.items():
        rows.append((
            name, c.method, c.dataset, c.arch, str(c.image_size), str(c.n_views), str(c.batch_size),
            str(c.emb), f"{c.lr:g}", str(c.epochs), _method_options(c),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("Table 1 presets reproduce the official commands of htdt/self-supervised (python -m train ...);")
    lines.append("Every field can be overridden on the command line; `wmse presets --show NAME` prints them all.")
    return "\n".join(lines)
