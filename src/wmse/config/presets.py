"""Named configurations: every command of Table 1 of the paper (as published in the official repository
htdt/self-supervised) is a preset named ``{dataset}-{method}``, e.g. ``cifar10-wmse4``; ``quick``
(Fashion-MNIST on a CPU in minutes) and ``cifar10-quick`` are demos.

>>> cfg = apply_overrides(get_preset("cifar10-wmse2"), {"epochs": "10", "lr": "1e-3"})
"""

from __future__ import annotations

from typing import Any

from .fields import fields_of
from .schema import Config

__all__ = ["PRESETS", "OFFICIAL_COMMANDS", "get_preset", "describe_presets", "preset_for_dataset"]


# ---------------------------------------------------------------------------------------------
# Presets: Table 1 of the paper, as the official README's commands (htdt/self-supervised).
# Official flags -> fields: --bs batch_size, --num_samples n_views, --epoch epochs, --emb emb,
# --w_size w_size, --w_iter w_iter, --lr lr, --crop_s0 crop_scale[0], --cj0..3 jitter, --gs_p
# grayscale_p. Unstated official defaults: bs 512, num_samples 2, w_size 128, w_iter 1,
# w_eps 0, head 1024, tau (contrastive_temperature) 0.5, byol_tau 0.99, adam_l2 1e-6, drop (50, 25) x0.2,
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
    # ImageNet-100: 224 px (standard stem), stronger augmentation. The JPEGs differ in size, so they are
    # decoded once to 256 px (shorter side 256, centre crop 256 x 256: 196 KB an image, ~25 GB for the
    # 126,689 training images) and RandomResizedCrop(224) samples from that square; the official code crops
    # the full image, so crops outside the centre square (a quarter of a 4:3 image) are not seen here.
    # Evaluation is Resize(256) + CenterCrop(224), as usual (the official code evaluates on a copy of the
    # images resized to 224 px): exact on the stored 256 px squares.
    "imagenet100": dict(
        dataset="imagenet100", image_size=224, emb=128, w_size=256, lr=2e-3, epochs=240, eval_split="val",
        resize=256, eval_resize=256, eval_size=224, crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), grayscale_p=0.2,
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
# net on a CPU of a few cores. fp32 because CPUs without native bf16 instructions emulate bf16 convolutions,
# far slower than fp32 (benchmarks/README.md).
# Cosine schedule: the step schedule's drops at E-50/E-25 would fall at epoch 0 of a short run.
# Milder crops than the official (0.2, 1): a 20 % crop of a 28 px garment loses its silhouette.
# lr, w_size and the crop were chosen by benchmarks/quick_sweep.py on a seeded held-out tenth of the
# training images, never the test split (benchmarks/README.md, "The quick preset"); the crop's effect was
# clear there, the lr's and w_size's were within the held-out set's noise.
_QUICK = Config(
    preset="quick",
    dataset="fashion_mnist", arch="small", image_size=28, emb=32, w_size=64, batch_size=128,
    epochs=4, lr=3e-3, warmup_iters=50, schedule="cosine",
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

# cifar10-fast: W-MSE 2 on the CIFAR-10 training images as one archive or folder (`--data_dir
# cifar10-train.zip`, benchmarks/cifar10_zip.sh makes it), 10% per class held out (seeded) for every
# evaluation, a cosine schedule short enough that pretraining and the final kNN + linear evaluation fit in
# one short command on one GPU; eight batches augmented per call and the step's host read every 50 steps
# keep the GPU busy. Provisional until measured on a GPU (`bash benchmarks/gpu.sh fast` measures it; the
# budget it was designed for and its status: benchmarks/README.md, "Notes moved from the code").
_CIFAR10_FAST = _CIFAR10_QUICK.replace(
    preset="cifar10-fast", epochs=200, lr=3e-3, warmup_iters=500, schedule="cosine", augment_batches=8,
    eval_every=25, ckpt_every=50, eval_max_train=10000, final_eval=True, linear_epochs=100,
)

# folder-wmse2: the CIFAR-10 W-MSE 2 recipe for any image folder, at the images' own size (image_size
# none: the side of the decoded images), 10% per class held out for evaluation unless --eval_data_dir
# names a test folder. What `--dataset folder` gets without a preset.
_FOLDER = _table1_presets()["cifar10-wmse2"].replace(preset="folder-wmse2", dataset="folder", image_size=None,
                                                     eval_split=None, holdout=0.1)

# ---------------------------------------------------------------------------------------------
# The whitening family on CIFAR: {cifar10,cifar100}-{method} with the authors' CIFAR settings, and
# {cifar10,cifar100}-{method}-wmse-protocol: that dataset's W-MSE 2 preset with only the method (and its own
# fields) changed, so a comparison with W-MSE changes one thing.
#
# CW-RGP, scripts/base.sh "CW-RGP 4" (--epochs 1000 --lr 3e-3 --num_samples 4 --bs 256 --w_size 64
#   --group 4, the same line for CIFAR-100) on the W-MSE code base with base/cfg.py's defaults (emb 512,
#   head 1024 x 2 layers, Adam wd 1e-6, drops x0.2 at E-50 and E-25, 500 warm-up iterations, W-MSE's
#   augmentation) of github.com/winci-ai/CW-RGP.
# INTL, scripts/cifar10.sh and cifar100.sh (--projection_size 2048 --epochs 1000 --lr 0.3 --wd 1e-4) with
#   cifar/cfg.py's defaults (bs 256, SGD momentum 0.9, lr x bs/256, 2 warm-up epochs = 390 steps of 195,
#   cosine to 0.001 x lr, a 3-layer 2048-wide projector, 4 IterNorm iterations) and cifar/transform.py
#   (crop scale (0.08, 1), jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, solarisation p 0 / 0.2 on the
#   two views) of github.com/winci-ai/INTL. Not reproduced: their projector's layers have no bias; their
#   crop is taken before the colour jitter (W-MSE's recipe jitters first); their cosine starts after the
#   warm-up (here it spans the whole run).
# Shuffled-DBN, configs/exp_small_200ep/cifar10/covnorm.yaml (and cifar100/) of
#   github.com/PatrickHua/FeatureDecorrelationSSL: projector 512-1024-512, 16 shuffled groups, SGD momentum
#   0.9, wd 1e-3, lr 0.02 x 64/256 = 0.005, 5 warm-up epochs (3,905 steps of 781), cosine to 0, batch 64,
#   200 epochs, SimSiam's augmentation (crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2).
# VICReg and Barlow Twins: their authors publish no CIFAR recipe. The CIFAR figures usually quoted for them
#   under the W-MSE protocol are the CW-RGP paper's, trained on the same W-MSE code base as CW-RGP above with
#   its default emb 512, bs 256, lr 3e-3, 1000 epochs; the losses are facebookresearch's (25 / 25 / 1 and
#   lambda 0.0051; CW-RGP's own baselines differ: see wmse.losses.vicreg / barlow_twins).
_FAMILY_AUTHORS: dict[str, dict[str, Any]] = {
    "cwrgp": dict(method="cwrgp", n_views=4, batch_size=256, w_size=64, cw_groups=4, emb=512),
    "intl": dict(method="intl", batch_size=256, optimizer="sgd", momentum=0.9, lr=0.3, weight_decay=1e-4,
                 warmup_iters=390, schedule="cosine", lr_end_factor=0.001, head_layers=3, head_hidden=2048,
                 emb=2048, crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), grayscale_p=0.2,
                 solarize_p=(0.0, 0.2)),
    "dbn": dict(method="dbn", batch_size=64, optimizer="sgd", momentum=0.9, lr=0.005, weight_decay=1e-3,
                warmup_iters=3905, schedule="cosine", epochs=200, head_hidden=1024, emb=512, dbn_groups=16,
                grayscale_p=0.2),
    "vicreg": dict(method="vicreg", batch_size=256, emb=512),
    "barlow": dict(method="barlow", batch_size=256, emb=512),
}
# Under the W-MSE protocol: the fields a method needs to work at all besides its name. CW-RGP whitens
# emb / cw_groups channels against w_size images (its authors' 512 / 4 against 64); DBN takes the authors'
# group of 32 channels of W-MSE's emb 64.
_FAMILY_WMSE_PROTOCOL: dict[str, dict[str, Any]] = {
    "cwrgp": dict(method="cwrgp", emb=512, w_size=64, cw_groups=4),
    "intl": dict(method="intl"),
    "dbn": dict(method="dbn", dbn_groups=2),
    "vicreg": dict(method="vicreg"),
    "barlow": dict(method="barlow"),
}


def _family_presets(table1: dict[str, Config]) -> dict[str, Config]:
    presets = {}
    for dataset in ("cifar10", "cifar100"):
        base = table1[f"{dataset}-wmse2"]
        for method, fields in _FAMILY_AUTHORS.items():
            presets[f"{dataset}-{method}"] = base.replace(preset=f"{dataset}-{method}", **fields)
        for method, fields in _FAMILY_WMSE_PROTOCOL.items():
            name = f"{dataset}-{method}-wmse-protocol"
            presets[name] = base.replace(preset=name, **fields)
    return presets


_TABLE1 = _table1_presets()
PRESETS: dict[str, Config] = {**_TABLE1, "quick": _QUICK, "cifar10-quick": _CIFAR10_QUICK,
                              "cifar10-fast": _CIFAR10_FAST, "folder-wmse2": _FOLDER, **_family_presets(_TABLE1)}


def preset_for_dataset(dataset: str | None) -> str:
    """The preset a run without ``--preset`` is based on: the paper's W-MSE 2 recipe for its dataset
    (``{dataset}-wmse2``), ``quick`` for Fashion-MNIST, ``folder-wmse2`` for an image folder or any
    other dataset; CIFAR-10's when no dataset is named."""
    dataset = dataset or "cifar10"
    if f"{dataset}-wmse2" in PRESETS:
        return f"{dataset}-wmse2"
    return "quick" if dataset == "fashion_mnist" else "folder-wmse2"


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
_SHOWN_OPTIONS = ("w_size", "w_iter", "contrastive_temperature", "byol_tau", "cw_groups", "dbn_groups", "intl_iters",
                  "barlow_lambd")


def describe_presets() -> str:
    """A plain-text table of every preset's main hyperparameters, grouped by method (for ``wmse presets``)."""
    from ..methods import METHODS

    cols = ("preset", "method", "dataset", "arch", "size", "d", "bs", "emb", "optim", "lr", "epochs", "method options")
    rows = [cols]
    groups = []
    for method, cls in METHODS.items():
        names = [n for n, c in PRESETS.items() if c.method == method]
        if not names:
            continue
        groups.append((len(rows), f"{cls.title or method} ({method}): {cls.citation}"))
        for name in names:
            c = PRESETS[name]
            rows.append((
                name, c.method, c.dataset, c.arch, str(c.image_size or "auto"), str(c.n_views), str(c.batch_size), str(c.emb),
                c.optimizer, f"{c.lr:g}", str(c.epochs), _method_options(c),
            ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    for offset, (at, header) in enumerate(groups):
        lines.insert(at + 2 * offset, "")
        lines.insert(at + 2 * offset + 1, header)
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("Table 1 presets ({dataset}-{wmse2,wmse4,contrastive,byol}) reproduce the official commands of")
    lines.append("htdt/self-supervised; {cifar10,cifar100}-{method} follow each method's authors, and")
    lines.append("*-wmse-protocol is cifar10/100-wmse2 with only the method changed (see src/wmse/config/presets.py).")
    lines.append("Every field can be overridden on the command line; `wmse presets --show NAME` prints them all.")
    return "\n".join(lines)
