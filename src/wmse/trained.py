"""Operations on a finished (or interrupted) run: load its encoder, evaluate it, export it.

``wmse evaluate``, ``wmse embed`` and ``wmse report`` are thin calls of the functions here.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import read_checkpoint, resolve_checkpoint, restore
from .config import Config
from .data import load
from .evaluate import evaluate_features, format_table
from .methods import Method, build_method
from .device import resolve_device
from .diagnostics import nonfinite_rows
from .fileio import check_replaceable, remove_orphans, write_atomic, write_folder_atomic, write_text_atomic
from .splits import load_run_data, normalization_stats
from .scoring import encode, make_eval_transform

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass
class TrainedRun:
    method: Method
    cfg: Config
    checkpoint: Path
    run_dir: Path
    in_channels: int
    epoch: int
    mean: tuple[float, ...] | None  # the normalisation used in training (None in old checkpoints)
    std: tuple[float, ...] | None


def _in_channels(backbone_state: dict) -> int:
    """Input channels of a backbone from its first convolution's weight (out, in, kh, kw)."""
    for tensor in backbone_state.values():
        if tensor.dim() == 4:
            return int(tensor.shape[1])
    raise ValueError("cannot find a convolution in the checkpoint's backbone")


def load_run(run_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild the trained method of a run directory or checkpoint file (eval mode, on ``device``)."""
    path = resolve_checkpoint(run_or_checkpoint)
    ckpt = read_checkpoint(path)
    cfg = Config.from_dict(ckpt.config)
    in_channels = _in_channels(ckpt.backbone)
    method = build_method(cfg, in_channels)
    restore(ckpt, method)
    method.to(device).eval()
    return TrainedRun(method, cfg, path, path.parent.parent, in_channels, ckpt.epoch, ckpt.mean, ckpt.std)


def _stats(run: TrainedRun, fallback: Callable[[], Stats]) -> Stats:
    """The normalisation the run trained with, else (old checkpoints) ``fallback()``."""
    if run.mean is not None and run.std is not None:
        return run.mean, run.std
    return fallback()


def evaluate_run(
    run_or_checkpoint: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    head: bool = False,
    linear: bool = True,
    linear_epochs: int | None = None,
    device: str = "auto",
    log=None,
) -> dict:
    """Frozen features of the classifier and test splits -> kNN (k=5 and weighted), linear probe, diagnostics.

    Results go to RUN/eval.json (RUN/eval_head.json for head outputs) and are returned. ``dataset`` /
    ``data_dir`` override the run's own (e.g. a run whose data moved). ``linear_epochs``: default the run's
    own ``linear_epochs``, so the probe is the one of its final evaluation (the paper's protocol: 500).
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    dev = resolve_device(device)
    run = load_run(run_or_checkpoint, dev)
    cfg = run.cfg.replace(**{k: v for k, v in (("dataset", dataset), ("data_dir", data_dir)) if v is not None})
    linear_epochs = linear_epochs or cfg.linear_epochs
    data = load_run_data(cfg, log)
    if data.eval_test_images is None:
        raise ValueError(f"dataset {cfg.dataset!r} has no labels here, so there is nothing to evaluate against")
    log(data.note)
    mean, std = _stats(run, lambda: (data.mean, data.std))  # those of the whole training split, as in training
    transform = make_eval_transform(cfg, mean, std, dev, channels_last=False)
    t0 = time.perf_counter()
    f_train = encode(run.method, data.eval_train_images, transform, cfg, dev, head=head)
    f_test = encode(run.method, data.eval_test_images, transform, cfg, dev, head=head)
    log(f"features {tuple(f_train.shape)} / {tuple(f_test.shape)} in {time.perf_counter() - t0:.1f}s")
    bad = nonfinite_rows(f_train) + nonfinite_rows(f_test)
    if bad:
        raise ValueError(f"{bad} of {len(f_train) + len(f_test)} feature rows of {run.checkpoint} are not finite "
                         "(the encoder diverged): nothing to evaluate")
    if linear:
        log(f"linear probe: {linear_epochs} epochs (the run's linear_epochs is {run.cfg.linear_epochs})")
    results = evaluate_features(f_train, data.eval_train_labels, f_test, data.eval_test_labels,
                                knn_k=cfg.knn_k, weighted_k=min(200, len(f_train)), linear=linear, linear_epochs=linear_epochs, seed=cfg.seed,
                                device=dev)
    results = {"checkpoint": str(run.checkpoint), "epoch": run.epoch, "dataset": cfg.dataset,
               "features": "head" if head else "backbone", "note": data.note, **results}
    out = run.run_dir / ("eval_head.json" if head else "eval.json")
    remove_orphans(run.run_dir)  # temporaries of writers that died (safe beside a live one: see fileio)
    write_text_atomic(out, json.dumps(results, indent=2))
    print(format_table({k: v for k, v in results.items() if k not in ("checkpoint", "note")}))
    print(f"({data.note}; written to {out})")
    return results


def export_backbone(run: TrainedRun, path: str | Path) -> Path:
    """The backbone's weights as safetensors, with arch / image_size / in_channels and the description that
    rebuilds it (``spec``, see :func:`wmse.models.backbone_description`) as metadata.

    For ResNets the keys are those of ``wmse.models.torchvision_resnet(arch, image_size, in_channels)``,
    i.e. a plain torchvision ResNet with the same stem and ``fc = Identity``.
    """
    blob = _backbone_bytes(run)
    return write_atomic(path, lambda f: f.write(blob))


def _backbone_bytes(run: TrainedRun) -> bytes:
    """The safetensors file of :func:`export_backbone`."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in run.method.backbone.state_dict().items()}
    meta = {"arch": run.cfg.arch, "image_size": str(run.cfg.image_size), "in_channels": str(run.in_channels),
            "format": "wmse-backbone-1", "spec": json.dumps(_description(run))}
    return save(state, metadata=meta)


def _description(run: TrainedRun) -> dict:
    from .models import backbone_description

    return backbone_description(run.method.backbone, run.cfg.arch, run.cfg.image_size, run.in_channels)


def load_exported_backbone(path: str | Path) -> nn.Module:
    """A model built from exported safetensors by its library (timm, torchvision; wmse's small net), strict load."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models import ARCHS, build_backbone, rebuild_backbone, torchvision_resnet

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    arch, size, chans = meta.get("arch"), int(meta.get("image_size", 0)), int(meta.get("in_channels", 3))
    spec = json.loads(meta.get("spec", "{}"))
    if spec.get("library"):
        model = rebuild_backbone(spec)
    else:  # exported before the description was written, or an arch registered outside wmse
        model = torchvision_resnet(arch, size, chans) if ARCHS[arch].resnet else build_backbone(arch, size, chans)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


# The files of one embed (``embed_run``'s keys -> names), written and replaced together.
EMBED_FILES = {"features": "features.npy", "labels": "labels.npy", "paths": "paths.txt",
               "backbone": "backbone.safetensors", "backbone_spec": "backbone.json"}


def embed_run(
    run_or_checkpoint: str | Path,
    out_dir: str | Path | None = None,
    split: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    head: bool = False,
    device: str = "auto",
    log=None,
) -> dict[str, Path]:
    """Write features.npy (float32), labels.npy (int64), paths.txt (image folders), backbone.safetensors and
    backbone.json (what rebuilds the backbone: library, name, kwargs; README "Encoders")."""
    log = log or (lambda m: print(m, file=sys.stderr))
    dev = resolve_device(device)
    run = load_run(run_or_checkpoint, dev)
    cfg = run.cfg.replace(**{k: v for k, v in (("dataset", dataset), ("data_dir", data_dir)) if v is not None})
    split = split or cfg.train_split
    out = Path(out_dir) if out_dir else run.run_dir / "embed" / split.replace("+", "_")
    check_replaceable(out, tuple(EMBED_FILES.values()))  # before the work: an unusable --out fails at once
    ds = load(cfg.dataset, split, cfg.data_dir)
    mean, std = _stats(run, lambda: normalization_stats(run.cfg.dataset, ds.images))
    feats = encode(run.method, ds.images, make_eval_transform(cfg, mean, std, dev, False), cfg, dev, head=head)
    blob = _backbone_bytes(run)
    spec = json.dumps(_description(run), indent=2) + "\n"
    writers = {"features": lambda f: np.save(f, feats.numpy()), "labels": lambda f: np.save(f, ds.labels.numpy()),
               "paths": lambda f: f.write(("\n".join(str(p) for p in ds.paths) + "\n").encode()),
               "backbone": lambda f: f.write(blob), "backbone_spec": lambda f: f.write(spec.encode())}
    if ds.paths is None:
        del writers["paths"]
    # one folder swapped in whole: a failure (a full disk) or a kill leaves the previous embed as it was
    written = write_folder_atomic(out, {EMBED_FILES[k]: w for k, w in writers.items()},
                                  owned=tuple(EMBED_FILES.values()))
    files = {k: written[EMBED_FILES[k]] for k in writers}
    log(f"{len(ds)} x {feats.shape[1]} features of {cfg.dataset}/{split} -> {out}")
    return files
