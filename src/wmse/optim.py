"""The optimizers a run can use, by name (``--optimizer``): one registry entry each.

Adam is the paper's (L2 ``weight_decay`` added to the gradient, as the official code). SGD with momentum is
what INTL and Shuffled-DBN train with on CIFAR.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .registry import Registry

if TYPE_CHECKING:
    from .config import Config

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("adam")
def _adam(params, cfg, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg, fused: bool = False) -> torch.optim.Optimizer:
    # Not fused: a skipped first step (found_inf) leaves fused SGD's momentum buffer uninitialised.
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_optimizer(params: Iterable[nn.Parameter], cfg: Config, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params`` at ``cfg.lr`` (the loop sets the lr of every step).

    ``fused``: torch's fused kernel where the optimizer has one (Adam), which can also skip a step on the
    device (``optimizer.found_inf``).
    """
    return OPTIMIZERS.get(cfg.optimizer, "optimizer")(params, cfg, fused=fused)
