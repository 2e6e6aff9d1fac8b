"""The pretraining loop: data -> batched augmentation -> method loss -> Adam, with schedule, logging,
periodic kNN, checkpoints, exact resume and clean interruption.

Read it top to bottom: :func:`pretrain` is the whole job; the helpers above it each do one step of it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import distributed
from .augment import AugmentConfig, Augmenter, eval_transform
from .checkpoint import load_checkpoint, rank_rng_state, rng_state, save_atomic, set_rng_state
from .config import Config, validate
from .data import ImageDataset, compute_stats, dataset_stats, load, split_per_class
from .data.loader import BatchLoader
from .errors import TrainingError
from .evaluate import extract_features, knn_accuracy, linear_probe
from .methods import Method, build_method
from .progress import MetricsLog, Progress
from .schedule import lr_factor
from .whitening import fallback_count


@dataclass
class Data:
    """Everything the loop needs from the dataset, as uint8 tensors on the CPU."""

    train: ImageDataset
    eval_train_images: Tensor | None  # for kNN: labelled, un-augmented
    eval_train_labels: Tensor | None
    eval_test_images: Tensor | None
    eval_test_labels: Tensor | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    note: str  # which split evaluation uses, said in the output


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available; use --device cpu")
    return device


def _subset(ds: ImageDataset, idx: Tensor) -> ImageDataset:
    paths = [ds.paths[i] for i in idx.tolist()] if ds.paths is not None else None
    return ImageDataset(images=ds.images[idx], labels=ds.labels[idx], classes=ds.classes, paths=paths, name=ds.name)


def normalization_stats(dataset: str, images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The dataset's published mean/std, or those of the images themselves (image folders)."""
    try:
        return dataset_stats(dataset)
    except (KeyError, ValueError):
        return compute_stats(images)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX); without them bf16 autocast is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown platform: do not second-guess the user
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_data(cfg: Config, log=print) -> Data:
    """Load the training split and a labelled evaluation pair (test split, or a seeded held-out split).

    The kNN / linear classifier fits on ``clf_split`` (default: the labelled images of the training split,
    e.g. STL-10's "train" when pretraining on "train+unlabeled") and is scored on ``eval_split``; without
    an eval split, a seeded per-class part of the training split is held out of pretraining and scored on.
    """
    t0 = time.perf_counter()
    train = load(cfg.dataset, cfg.train_split, cfg.data_dir)
    log(f"data: {cfg.dataset}/{cfg.train_split}: {len(train)} images {tuple(train.images.shape[1:])} "
        f"in {time.perf_counter() - t0:.1f}s")
    mean, std = normalization_stats(cfg.dataset, train.images)
    if cfg.eval_split is None:
        if not bool((train.labels >= 0).any()):
            return Data(train, None, None, None, None, mean, std, "no labels: kNN monitoring off")
        train_idx, test_idx = split_per_class(train.labels, cfg.holdout, cfg.seed)
        kept, held = _subset(train, train_idx), _subset(train, test_idx)
        note = (f"evaluation on a seeded per-class held-out split of {cfg.train_split}: {len(test_idx)} images "
                f"(holdout={cfg.holdout}, seed={cfg.seed}); pretraining and the classifiers use the other "
                f"{len(train_idx)}")
        return Data(kept, kept.images, kept.labels, held.images, held.labels, mean, std, note)
    clf = load(cfg.dataset, cfg.clf_split, cfg.data_dir) if cfg.clf_split else train
    labelled = clf.labels >= 0
    if not bool(labelled.any()):
        return Data(train, None, None, None, None, mean, std, "no labels: kNN monitoring off")
    if not bool(labelled.all()):
        clf = _subset(clf, labelled.nonzero().squeeze(1))
    test = load(cfg.dataset, cfg.eval_split, cfg.data_dir)
    note = (f"classifiers fit on {cfg.clf_split or cfg.train_split} ({len(clf)} labelled images), "
            f"scored on {cfg.eval_split} ({len(test)} images)")
    return Data(train, clf.images, clf.labels, test.images, test.labels, mean, std, note)


def augment_config(cfg: Config) -> AugmentConfig:
    return AugmentConfig(
        size=cfg.image_size, crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
        jitter=tuple(cfg.jitter), jitter_p=cfg.jitter_p, grayscale_p=cfg.grayscale_p, flip_p=cfg.flip_p,
    )


def make_eval_transform(cfg: Config, mean, std, device: torch.device, channels_last: bool):
    """uint8 batch -> normalised float batch on ``device``: optional resize, centre crop, no augmentation."""
    size = cfg.eval_size or cfg.image_size

    def transform(images: Tensor) -> Tensor:
        x = eval_transform(images.to(device, non_blocking=True), size, mean, std, resize=cfg.eval_resize)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    return transform


def encode(method: Method, images: Tensor, transform, cfg: Config, device: torch.device, head: bool = False) -> Tensor:
    """Frozen features of uint8 images (eval mode, no augmentation), float32 on the CPU."""
    was_training = method.training
    method.eval()
    try:
        fn = (lambda x: method.features(x, head=True)) if head else method.features
        return extract_features(fn, images, transform, batch_size=512, device=device,
                                autocast=cfg.precision == "bf16")
    finally:
        method.train(was_training)


def subsample(images: Tensor, labels: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    if n is None or n >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def knn_monitor(method: Method, data: Data, cfg: Config, device: torch.device, transform) -> dict:
    """Cheap kNN accuracy in percent (k = cfg.knn_k) on at most cfg.eval_max_train training images."""
    tr_x, tr_y = subsample(data.eval_train_images, data.eval_train_labels, cfg.eval_max_train, cfg.seed)
    te_x, te_y = subsample(data.eval_test_images, data.eval_test_labels, cfg.eval_max_train, cfg.seed + 1)
    f_tr = encode(method, tr_x, transform, cfg, device)
    f_te = encode(method, te_x, transform, cfg, device)
    return {"knn_top1": knn_accuracy(f_tr, tr_y, f_te, te_y, k=cfg.knn_k)}


def final_evaluation(method: Method, initial_state: dict, data: Data, cfg: Config, device, transform, log) -> dict:
    """kNN + linear probe (percentages) of the trained encoder and of the same encoder at its random init."""
    results = {}
    trained_state = copy.deepcopy(method.state_dict())
    for name, state in (("random_init", initial_state), ("trained", trained_state)):
        method.load_state_dict(state)
        f_tr = encode(method, data.eval_train_images, transform, cfg, device)
        f_te = encode(method, data.eval_test_images, transform, cfg, device)
        knn = knn_accuracy(f_tr, data.eval_train_labels, f_te, data.eval_test_labels, k=cfg.knn_k)
        lin = linear_probe(f_tr, data.eval_train_labels, f_te, data.eval_test_labels, epochs=cfg.linear_epochs,
                           seed=cfg.seed, device=device)
        results[name] = {"knn_top1": knn, "linear_top1": lin["top1"], "linear_top5": lin["top5"]}
        log(f"final eval [{name}]: kNN(k={cfg.knn_k}) {knn:.2f}%  linear top-1 {lin['top1']:.2f}%")
    method.load_state_dict(trained_state)
    return results


def format_final(results: dict, note: str) -> str:
    rows = [f"{'encoder':<14}{'kNN top-1':>11}{'linear top-1':>14}{'linear top-5':>14}"]
    for name, r in results.items():
        rows.append(f"{name:<14}{r['knn_top1']:>10.2f}%{r['linear_top1']:>13.2f}%{r['linear_top5']:>13.2f}%")
    if "trained" in results and "random_init" in results:
        gain = results["trained"]["knn_top1"] - results["random_init"]["knn_top1"]
        rows.append(f"kNN gain over random init: {gain:+.2f} points")
    rows.append(f"({note})")
    return "\n".join(rows)


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and returns.

    ``announce``: print the one-line notice (torchrun sends the signal to every rank; only the
    main rank says so).
    """

    def __init__(self, announce: bool = True) -> None:
        self.signal: int | None = None
        self.announce = announce

    def __call__(self, signum, frame) -> None:
        if self.signal is not None:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:
            print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint and stopping after this step",
                  file=sys.stderr)

    @contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def make_run_dir(cfg: Config) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.run_name or f"{cfg.preset or cfg.dataset + '-' + cfg.method}-{stamp}"
    run_dir = Path(cfg.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def pretrain(cfg: Config, resume: str | Path | None = None, log=None) -> Path:
    """Run (or resume) pretraining; returns the run directory.

    ``resume``: a run directory or checkpoint; training continues exactly where it stopped (same batches,
    augmentations and random slices), in the same run directory.
    """
    validate(cfg)
    rt = distributed.setup(cfg)
    log = log or (lambda msg: print(msg, file=sys.stderr) if rt.is_main else None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = rt.device
    torch.manual_seed(cfg.seed)

    ckpt = load_checkpoint(resume) if resume else None
    run_dir = Path(resume).resolve().parent.parent if resume and Path(resume).is_file() else (
        Path(resume) if resume else make_run_dir(cfg) if rt.is_main else None)
    run_dir = distributed.broadcast_object(run_dir, rt)  # rank 0 names it (a time stamp); no stray folders
    data = load_data(cfg, log)
    if len(data.train) < cfg.batch_size:
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({len(data.train)} images)")
    in_channels = data.train.images.shape[1]

    method = build_method(cfg, in_channels).to(device)
    initial_state = copy.deepcopy(method.state_dict()) if cfg.final_eval else None
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if cfg.compile:
        # In place: the module keeps its state_dict keys, so checkpoints stay loadable without compile.
        method.backbone.compile()
    train_module = distributed.wrap(method, cfg, rt)
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = Augmenter(augment_config(cfg), data.mean, data.std)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rt.rank)
    loader = BatchLoader(data.train.images, cfg.batch_size, seed=cfg.seed, device=device,
                         rank=rt.rank, world_size=rt.world_size)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    transform = make_eval_transform(cfg, data.mean, data.std, device, cfg.channels_last)

    start_epoch, start_batch, step, nonfinite_total = 0, 0, 0, 0
    if ckpt is not None:
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        written_by = len(ckpt.get("rng_ranks", [None]))
        if written_by != rt.world_size:
            log(f"note: the checkpoint was written by {written_by} process(es), this run has {rt.world_size}: "
                "batches are the same, augmentations after the resume differ from an uninterrupted run")
        set_rng_state(rank_rng_state(ckpt, rt.rank, aug_gen), aug_gen)
        distributed.set_step(train_module, ckpt["step"])
        start_epoch, start_batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        nonfinite_total = ckpt.get("nonfinite_total", 0)
        if initial_state is not None and "initial_method" in ckpt:
            initial_state = ckpt["initial_method"]
        log(f"resumed from {resume} at epoch {start_epoch + 1}, step {step}")

    metrics = MetricsLog(run_dir) if rt.is_main else None
    if rt.is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log(f"run directory: {run_dir}\n{data.note}")
        log(f"method {cfg.method} (d={cfg.n_views}), {cfg.arch} at {cfg.image_size}px, batch {cfg.batch_size}, "
            f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {device} ({cfg.precision})")

    def checkpoint(epoch: int, batch: int) -> None:
        rng_ranks = distributed.gather_objects(rng_state(aug_gen), rt)  # every rank takes part
        if not rt.is_main:
            distributed.barrier(rt)  # wait until rank 0 has written it
            return
        state = {
            "method": method.state_dict(), "backbone": method.backbone.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch, "step": step,
            "rng": rng_ranks[0], "rng_ranks": rng_ranks, "world_size": rt.world_size,
            "config": cfg.to_dict(), "nonfinite_total": nonfinite_total,
            "mean": list(data.mean), "std": list(data.std),  # so evaluation normalises exactly as training
        }
        if initial_state is not None:
            state["initial_method"] = initial_state
        save_atomic(state, run_dir / "checkpoints" / "last.pt")
        distributed.barrier(rt)

    use_bf16 = cfg.precision == "bf16"
    if use_bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        log("note: this CPU has no native bf16 instructions, so bf16 autocast is emulated and several times "
            "slower than fp32 here; consider --precision fp32")
    progress = Progress(total_steps) if rt.is_main else None
    stop = StopFlag(announce=rt.is_main)
    nonfinite_run = 0
    finished, stopping = True, False
    with stop.installed():
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            first = start_batch if epoch == start_epoch else 0
            for batch_idx, (images, _) in enumerate(loader.epoch(epoch, start=first), start=first):
                t0 = time.perf_counter()
                lr = cfg.lr * lr_factor(step, steps_per_epoch, cfg.epochs, cfg.warmup_iters, cfg.schedule,
                                        cfg.lr_drop_epochs, cfg.lr_drop_factor)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                views = augment(images, cfg.n_views, generator=aug_gen)
                if cfg.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = train_module(views)
                # the one host read per step (finiteness needs it); under DDP the mean over ranks, and
                # every rank learns whether any rank was signalled, so all take the same branch below
                loss_value, stopping = distributed.agree(loss, stop.signal is not None, rt)
                optimizer.zero_grad(set_to_none=True)
                if math.isfinite(loss_value):
                    nonfinite_run = 0
                    loss.backward()
                    optimizer.step()
                    method.on_step(step + 1, total_steps)
                else:
                    nonfinite_run += 1
                    nonfinite_total += 1
                    if nonfinite_run >= cfg.nonfinite_limit:
                        raise TrainingError(
                            f"loss was non-finite for {nonfinite_run} steps in a row (step {step}). Likely causes: "
                            f"learning rate too high (lr={cfg.lr}), w_size ({cfg.w_size}) too small for the embedding "
                            f"size ({cfg.emb}; w_size >= 2*emb is recommended), or eps=0 with collapsed embeddings "
                            f"(try --w_eps 1e-4 or --precision fp32)")
                step += 1
                if rt.is_main:
                    img_s = cfg.batch_size / (time.perf_counter() - t0)
                    progress.update(step, epoch, cfg.epochs, loss_value, lr, img_s)
                    if step % cfg.log_every == 0 or step == total_steps:
                        metrics.write("train", step, epoch=epoch, loss=loss_value, lr=lr, img_per_s=img_s,
                                      nonfinite_skipped=nonfinite_total)
                if stopping or (cfg.max_steps is not None and step >= cfg.max_steps):
                    finished = False
                    checkpoint(epoch, batch_idx + 1)
                    break
            if not finished:
                break
            epoch_done = epoch + 1
            if rt.is_main:
                end_of_epoch(method, data, cfg, device, transform, metrics, step, epoch_done, t_epoch, log)
            if epoch_done % cfg.ckpt_every == 0 or epoch_done == cfg.epochs:
                checkpoint(epoch_done, 0)
    if progress is not None:
        progress.close()
    fallbacks = fallback_count()
    if fallbacks and rt.is_main:
        log(f"whitening: {fallbacks} slice covariances needed jitter during this run")
    distributed.barrier(rt)  # all checkpoints written; rank 0 alone goes on to the final evaluation
    if not finished:
        reason = "signal" if stopping else f"max_steps={cfg.max_steps}"
        log(f"stopped at step {step} ({reason}); resume with: wmse pretrain --resume {run_dir}")
    elif cfg.final_eval and rt.is_main and data.eval_test_images is not None:
        results = final_evaluation(method, initial_state, data, cfg, device, transform, log)
        (run_dir / "final_eval.json").write_text(json.dumps({"note": data.note, **results}, indent=2))
        print(format_final(results, data.note))
    if metrics is not None:
        metrics.close()
    distributed.cleanup(rt)
    return run_dir


def end_of_epoch(method, data, cfg, device, transform, metrics, step, epoch_done, t_epoch, log) -> None:
    """Per-epoch summary, and every cfg.eval_every epochs the kNN monitor and embedding diagnostics."""
    seconds = time.perf_counter() - t_epoch
    metrics.write("epoch", step, epoch=epoch_done, seconds=seconds, whitening_fallbacks=fallback_count())
    if data.eval_test_images is None or not cfg.eval_every:
        return
    if epoch_done % cfg.eval_every != 0 and epoch_done != cfg.epochs:
        return
    result = knn_monitor(method, data, cfg, device, transform)
    diag = diagnostics_record(method, data, cfg, device, transform)
    metrics.write("eval", step, epoch=epoch_done, **result)
    metrics.write("diagnostics", step, epoch=epoch_done, **diag)
    log(f"epoch {epoch_done}: kNN top-1 {result['knn_top1']:.2f}% "
        f"(eff. rank features {diag.get('feature_eff_rank', float('nan')):.1f}) [{seconds:.0f}s/epoch]")


def diagnostics_record(method, data, cfg, device, transform) -> dict:
    from .diagnostics import embedding_diagnostics

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
