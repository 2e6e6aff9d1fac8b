"""Multi-process training with torchrun + DistributedDataParallel, and W-MSE whitening across ranks.

A single process (no torchrun, ``WORLD_SIZE`` unset or 1) is a :class:`Runtime` with world_size 1 and every
helper here is then a no-op. Under torchrun each rank takes a contiguous part of every global batch
(``BatchLoader(rank=, world_size=)``), and :func:`wrap` returns a DDP module whose ``forward(views, ctx)`` is the
method's loss. The loop calls it the same way in one process: ``ctx`` (:func:`process_context`) carries the
step, the seed and the differentiable all-gather of this module (:func:`gather_cat`, the identity in one
process); each method decides in ``Method.loss`` what it gathers, and nothing here knows any method:

- W-MSE, default: each rank whitens slices of its own ``batch_size / world_size`` images; DDP averages the
  gradients, i.e. the gradient of the mean of the per-rank losses.
- W-MSE, ``whiten_global``: embeddings of all ranks are gathered, every rank computes the single-process loss
  of the global batch (slices from one permutation shared by all ranks), and the gradient equals the
  single-process gradient on the concatenated batch (see :class:`_GatherCat`).
- Contrastive: the same gather, so negatives come from the whole global batch.
- BYOL: its loss is a mean over images, so DDP's gradient average already is the global-batch gradient.

BatchNorm statistics stay per rank unless ``sync_bn`` (CUDA only: torch's SyncBatchNorm has no CPU kernel).

Learning rate: ``batch_size`` is the global N, and DDP averages gradients, so a run with K processes and the
same ``batch_size`` takes the same steps as one process: keep ``lr`` when changing K. Changing N itself is a
change of recipe (the presets' lr values belong to N = 512 for d = 2, 256 for d = 4).

Communication per step, on top of DDP's gradient all-reduce (about 2 x parameters floats per rank):
``whiten_global`` and Contrastive gather d x N x D embedding floats in the forward and all-reduce as many
gradient floats in the backward (CIFAR, d=2, N=512, D=64: 65,536 floats = 256 KiB, against 45 MiB of
ResNet-18 gradients); per-rank whitening and BYOL add nothing; every mode all-reduces 2 floats (loss, stop).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .device import resolve_device
from .methods import METHODS, Method, ProcessContext

__all__ = [
    "Runtime", "setup", "wrap", "cleanup", "check_batch", "process_context", "gather_cat", "agree", "broadcast_object",
    "gather_objects", "barrier",
]

# Generous: rank 0 evaluates (kNN, diagnostics) while the other ranks wait in their next collective.
_TIMEOUT = timedelta(minutes=60)


@dataclass
class Runtime:
    """Where this process runs and which part of the job it is."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_batch(cfg, world_size: int) -> None:
    """ValueError (naming batch_size, w_size and nproc) when the global batch cannot be split over the ranks."""
    if world_size <= 1:
        return
    if cfg.batch_size % world_size:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be a multiple of nproc ({world_size}): the global batch is split "
            f"evenly over the processes; e.g. batch_size={max(1, cfg.batch_size // world_size) * world_size}"
        )
    local = cfg.batch_size // world_size
    if local < 2:
        raise ValueError(f"batch_size ({cfg.batch_size}) / nproc ({world_size}) = {local} image per process; "
                         "BatchNorm needs at least 2: raise batch_size or lower nproc")
    METHODS.get(cfg.method, "method").check_processes(cfg, world_size)
    if cfg.sync_bn and resolve_device(cfg.device).type != "cuda":
        raise ValueError("sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); "
                         "drop --sync_bn or run with --device cuda")


def setup(cfg) -> Runtime:
    """Read torchrun's environment; initialise the process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1.

    Under torchrun a CUDA run uses ``cuda:LOCAL_RANK`` (one GPU per process).
    """
    device = resolve_device(cfg.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Runtime(device=device)
    check_batch(cfg, world_size)  # before any rendezvous, so a bad config fails fast on every rank
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=_TIMEOUT, **kwargs)
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


class _GatherCat(torch.autograd.Function):
    """All-gather along dim ``dim`` (rank order) whose backward is the sum of the gradients of every rank.

    Rank q computes a loss L_q of the gathered E whose mean over ranks is the global loss L (W-MSE with
    global whitening: L_q = L; contrastive: the mean over rank q's anchors). The gradient reaching rank r's
    part is sum_q dL_q/dE_r = W dL/dE_r. DDP then averages parameter gradients over W ranks:
    (1/W) sum_r W (dL/dE_r)(dE_r/dtheta) = dL/dtheta, the single-process gradient on the whole batch.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.dim, ctx.size = dim, x.shape[dim]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks (gloo has no reduce_scatter; the tensor is small: d x N x D)
        return grad.narrow(ctx.dim, dist.get_rank() * ctx.size, ctx.size), None


def gather_cat(x: Tensor, dim: int = 0) -> Tensor:
    """Differentiable all-gather: every rank's ``x`` concatenated along ``dim`` in rank order.

    Shapes: (..., n, ...) on each of W ranks -> (..., W n, ...). The backward sums over ranks (see _GatherCat).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherCat.apply(x, dim)


def process_context(rt: Runtime, seed: int, step: int) -> ProcessContext:
    """The context of training step ``step`` (0-based: the steps taken before it) on this process: what
    ``Method.loss`` gathers with, and the seed of its random draws, a function of (seed, step, rank), so a
    resumed run draws what an uninterrupted one would."""
    return ProcessContext(rt.rank, rt.world_size, step, seed, gather_cat)


def _convert_sync_bn(method: Method) -> None:
    """BatchNorm -> SyncBatchNorm in the submodules the method names (``sync_bn_modules``), in place."""
    for name in method.sync_bn_modules:
        setattr(method, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(method, name)))


def wrap(method: nn.Module, cfg, rt: Runtime) -> Callable:
    """The callable the loop trains: ``(views, ctx) -> loss``. ``method`` itself in one process, else a DDP module
    around it.

    The optimizer keeps working on ``method``'s parameters (DDP shares them); checkpoints save ``method``.
    """
    if not rt.distributed:
        return method
    check_batch(cfg, rt.world_size)
    if cfg.sync_bn:
        _convert_sync_bn(method)
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(method, device_ids=device_ids)


def agree(loss: Tensor, flags: bool | tuple[bool, ...], rt: Runtime) -> tuple[float, bool | tuple[bool, ...]]:
    """Mean loss over ranks and, for each flag (one bool or a tuple: a signal, a deadline), whether any rank
    raised it: one tiny all-reduce, the step's host read.

    Every rank then takes the same decision (skip a non-finite step, checkpoint and stop), which DDP needs:
    a rank that skipped backward or left the loop while the others go on would hang them.
    """
    single = isinstance(flags, bool)
    flags = (flags,) if single else tuple(flags)
    if not rt.distributed:
        total, raised = loss.item(), flags
    else:
        buf = torch.tensor([0.0, *map(float, flags)], device=loss.device)
        buf[0] = loss.detach().float().reshape(())
        dist.all_reduce(buf)
        total, *counts = buf.tolist()
        total, raised = total / rt.world_size, tuple(c > 0 for c in counts)
    return total, raised[0] if single else raised


def mean_over_ranks(loss: Tensor, rt: Runtime) -> Tensor:
    """The mean of ``loss`` over ranks, left on the device (no host read): every rank then sees the same
    finiteness, so all skip or all update."""
    if not rt.distributed:
        return loss
    total = loss.detach().float().reshape(()).clone()
    dist.all_reduce(total)
    return total / rt.world_size


def broadcast_object(obj: Any, rt: Runtime) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run directory, whose name holds a time stamp)."""
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, rt: Runtime) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (e.g. the RNG states a checkpoint must hold)."""
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def cleanup(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
