"""The optimizers a run can use, by name (``--optimizer``): one registry entry each.

Adam is the paper's (L2 ``weight_decay`` added to the gradient, as the official code). SGD with momentum is
what INTL and Shuffled-DBN train with on CIFAR. AdamW (decoupled weight decay, Loshchilov & Hutter, ICLR 2019)
is what ViTs train with; as in timm and DeiT, weight decay is kept off the parameters that :func:`decays`
says no to: norm scales and biases (every parameter of <= 1 dimension) and position / class tokens.

A registry entry is ``fn(named, cfg, fused=False) -> Optimizer`` over a list of (name, parameter) pairs;
``build_optimizer`` also takes bare parameters (named ``""``: AdamW then groups them by dimension alone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .registry import Registry

if TYPE_CHECKING:
    from .config import Config

__all__ = ["OPTIMIZERS", "DEVICE_SKIP", "NO_DECAY_NAMES", "build_optimizer", "decays", "weight_decay_groups"]

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")

# Optimizers whose fused kernel can skip a step on the device (``found_inf``).
DEVICE_SKIP = frozenset({"adam", "adamw"})

# Learned tokens and position embeddings, by attribute name (timm's ``no_weight_decay()`` sets of ViT, DeiT,
# Swin, ... and torchvision's ViT / Swin): AdamW leaves them undecayed.
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "dist_token", "reg_token", "mask_token", "absolute_pos_embed",
                            "relative_position_bias_table", "class_token", "pos_embedding"})


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW decays ``param`` (named ``name`` in its module): not norms, biases, tokens, positions."""
    return param.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def weight_decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two parameter groups: ``weight_decay`` for the parameters :func:`decays` accepts, 0 for the rest."""
    named = list(named)
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


@OPTIMIZERS.register("adam")
def _adam(named, cfg, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


@OPTIMIZERS.register("sgd")
def _sgd(named, cfg, fused: bool = False) -> torch.optim.Optimizer:
    # Not fused: a skipped first step (found_inf) leaves fused SGD's momentum buffer uninitialised.
    return torch.optim.SGD([p for _, p in named], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(named, cfg, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(weight_decay_groups(named, cfg.weight_decay), lr=cfg.lr, fused=fused or None)


def build_optimizer(params: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]], cfg: Config,
                    fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params`` at ``cfg.lr`` (the loop sets the lr of every step).

    ``params``: parameters, or (name, parameter) pairs such as ``method.named_trainable_parameters()``.

    ``fused``: torch's fused kernel where the optimizer has one (Adam), which can also skip a step on the
    device (``optimizer.found_inf``).
    """
    named = [item if isinstance(item, tuple) else ("", item) for item in params]
    return OPTIMIZERS.get(cfg.optimizer, "optimizer")(named, cfg, fused=fused)
