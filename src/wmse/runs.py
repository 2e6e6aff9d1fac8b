"""Operations on a finished (or interrupted) run: load its encoder, evaluate it, export it.

``wmse evaluate``, ``wmse embed`` and ``wmse report`` are thin calls of the functions here.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import Config
from .data import load
from .evaluate import evaluate_features, format_table
from .methods import Method, build_method
from .device import resolve_device
from .run_data import load_run_data, normalization_stats
from .run_eval import encode, make_eval_transform


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
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"])
    in_channels = _in_channels(ckpt["backbone"])
    method = build_method(cfg, in_channels)
    method.load_state_dict(ckpt["method"])
    method.to(device).eval()
    mean, std = ckpt.get("mean"), ckpt.get("std")
    return TrainedRun(method, cfg, path, path.parent.parent, in_channels, int(ckpt["epoch"]),
                      tuple(mean) if mean else None, tuple(std) if std else None)


def _stats(run: TrainedRun, images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if run.mean is not None and run.std is not None:
        return run.mean, run.std
    return normalization_stats(run.cfg.dataset, images)


def evaluate_run(
    run_or_checkpoint: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    head: bool = False,
    linear: bool = True,
    linear_epochs: int = 500,
    device: str = "auto",
    log=None,
) -> dict:
    """Frozen features of the classifier and test splits -> kNN (k=5 and weighted), linear probe, diagnostics.

    Results go to RUN/eval.json (RUN/eval_head.json for head outputs) and are returned. ``dataset`` /
    ``data_dir`` override the run's own (e.g. a run whose data moved).
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    dev = resolve_device(device)
    run = load_run(run_or_checkpoint, dev)
    cfg = run.cfg.replace(**{k: v for k, v in (("dataset", dataset), ("data_dir", data_dir)) if v is not None})
    data = load_run_data(cfg, log)
    if data.eval_test_images is None:
        raise ValueError(f"dataset {cfg.dataset!r} has no labels here, so there is nothing to evaluate against")
    log(data.note)
    mean, std = _stats(run, data.train.images)
    transform = make_eval_transform(cfg, mean, std, dev, channels_last=False)
    t0 = time.perf_counter()
    f_train = encode(run.method, data.eval_train_images, transform, cfg, dev, head=head)
    f_test = encode(run.method, data.eval_test_images, transform, cfg, dev, head=head)
    log(f"features {tuple(f_train.shape)} / {tuple(f_test.shape)} in {time.perf_counter() - t0:.1f}s")
    results = evaluate_features(f_train, data.eval_train_labels, f_test, data.eval_test_labels,
                                knn_k=cfg.knn_k, weighted_k=min(200, len(f_train)), linear=linear, linear_epochs=linear_epochs, seed=cfg.seed,
                                device=dev)
    results = {"checkpoint": str(run.checkpoint), "epoch": run.epoch, "dataset": cfg.dataset,
               "features": "head" if head else "backbone", "note": data.note, **results}
    out = run.run_dir / ("eval_head.json" if head else "eval.json")
    out.write_text(json.dumps(results, indent=2))
    print(format_table({k: v for k, v in results.items() if k not in ("checkpoint", "note")}))
    print(f"({data.note}; written to {out})")
    return results


def export_backbone(run: TrainedRun, path: str | Path) -> Path:
    """The backbone's weights as safetensors, with arch / image_size / in_channels as metadata.

    For ResNets the keys are those of ``wmse.models.torchvision_resnet(arch, image_size, in_channels)``,
    i.e. a plain torchvision ResNet with the same stem and ``fc = Identity``.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in run.method.backbone.state_dict().items()}
    meta = {"arch": run.cfg.arch, "image_size": str(run.cfg.image_size), "in_channels": str(run.in_channels),
            "format": "wmse-backbone-1"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def load_exported_backbone(path: str | Path) -> nn.Module:
    """A model built from exported safetensors: a plain torchvision ResNet (or the small net), strict load."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models import ARCHS, build_backbone, torchvision_resnet

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    arch, size, chans = meta.get("arch"), int(meta.get("image_size", 0)), int(meta.get("in_channels", 3))
    model = torchvision_resnet(arch, size, chans) if ARCHS[arch].resnet else build_backbone(arch, size, chans)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


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
    """Write features.npy (float32), labels.npy (int64), paths.txt (image folders) and backbone.safetensors."""
    log = log or (lambda m: print(m, file=sys.stderr))
    dev = resolve_device(device)
    run = load_run(run_or_checkpoint, dev)
    cfg = run.cfg.replace(**{k: v for k, v in (("dataset", dataset), ("data_dir", data_dir)) if v is not None})
    split = split or cfg.train_split
    out = Path(out_dir) if out_dir else run.run_dir / "embed" / split.replace("+", "_")
    out.mkdir(parents=True, exist_ok=True)
    ds = load(cfg.dataset, split, cfg.data_dir)
    mean, std = _stats(run, ds.images)
    feats = encode(run.method, ds.images, make_eval_transform(cfg, mean, std, dev, False), cfg, dev, head=head)
    files = {"features": out / "features.npy", "labels": out / "labels.npy"}
    np.save(files["features"], feats.numpy())
    np.save(files["labels"], ds.labels.numpy())
    if ds.paths is not None:
        files["paths"] = out / "paths.txt"
        files["paths"].write_text("\n".join(str(p) for p in ds.paths) + "\n")
    files["backbone"] = export_backbone(run, out / "backbone.safetensors")
    log(f"{len(ds)} x {feats.shape[1]} features of {cfg.dataset}/{split} -> {out}")
    return files
