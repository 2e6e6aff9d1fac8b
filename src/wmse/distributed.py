"""Process-group set-up for torchrun / DDP. A single process (no torchrun) is world_size 1."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Runtime:
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


def setup(cfg) -> Runtime:
    """Read torchrun's environment; initialise the process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    from .train import resolve_device

    device = resolve_device(cfg.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Runtime(device=device)
    raise ValueError("multi-process training (WORLD_SIZE > 1) is not supported yet")


def wrap(method: nn.Module, cfg, rt: Runtime) -> Callable:
    """The callable the loop trains: views -> loss."""
    return method


def cleanup(rt: Runtime) -> None:
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
