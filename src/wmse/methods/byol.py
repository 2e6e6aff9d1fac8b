"""BYOL (Grill et al., NeurIPS 2020), the W-MSE paper's non-contrastive baseline: online networks and a
predictor regress an EMA target's projection of another view."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checks import check_min, check_range
from ..losses import byol_loss
from ..models import ProjectionHead
from .base import METHODS, ONE_PROCESS, Method, ProcessContext, check_views, view_pairs

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["BYOL", "byol_tau"]


def byol_tau(step: int, total_steps: int, tau0: float) -> float:
    """EMA rate of BYOL's target: rises from ``tau0`` at step 0 to 1 at ``total_steps`` (cosine)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - tau0) * (math.cos(math.pi * progress) + 1.0) / 2.0


@METHODS.register("byol")
class BYOL(Method):
    """BYOL: online backbone + head + predictor regress an EMA target's projection of another view.

    The target (``target_backbone``, ``target_head``) starts as a copy of the online networks, never
    receives gradients and follows them by EMA in :meth:`on_step`. Loss for every pair i < j:
    ``byol_loss(p_i, z'_j) + byol_loss(p_j, z'_i)``, averaged over pairs (the official symmetric sum).
    The loss is always the normalised MSE (the official ``--no_norm`` variant of BYOL is not offered).
    """

    title = "BYOL"
    citation = ('Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020')

    @dataclass(frozen=True)
    class Options:
        byol_tau: float = 0.99  # initial EMA rate of the target (official --byol_tau)
        byol_predictor_hidden: int = 1024  # the predictor's hidden width when built here (official: head_size)

    renamed_fields = {"tau": "byol_tau", "predictor_hidden": "byol_predictor_hidden"}
    sync_bn_modules = ("head", "predictor", "target_head")

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module | None = None,
                 **options: Any) -> None:
        """``predictor`` None: a :class:`ProjectionHead` ``head.out_dim -> byol_predictor_hidden -> head.out_dim``."""
        super().__init__(backbone, head, **options)
        if not 0.0 <= self.byol_tau <= 1.0:
            raise ValueError(f"byol_tau (BYOL's initial EMA rate) must be in [0, 1], got {self.byol_tau}")
        if predictor is None:  # after the head: the order of the random inits
            emb = getattr(head, "out_dim", None)
            if emb is None:
                raise ValueError("BYOL: pass predictor=... (this head has no out_dim to size one by)")
            predictor = ProjectionHead(emb, self.byol_predictor_hidden, emb)
        self.predictor = predictor
        self.tau = self.byol_tau  # the current EMA rate (on_step raises it towards 1)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_head = copy.deepcopy(head)
        for p in self._target_parameters():
            p.requires_grad_(False)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        check_range("byol_tau", cfg.byol_tau, 0.0, 1.0)
        check_min("byol_predictor_hidden", cfg.byol_predictor_hidden, 1)

    def _target_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.target_backbone.parameters()
        yield from self.target_head.parameters()

    def loss(self, views: Sequence[Tensor], ctx: ProcessContext = ONE_PROCESS) -> Tensor:
        """A mean over images: nothing gathered under DDP (its gradient average is the global-batch gradient)."""
        check_views(views)
        d = len(views)
        p = list(self.predictor(torch.cat(self.embed(views))).chunk(d))
        with torch.no_grad():
            z = list(self.target_head(self.target_backbone(torch.cat(list(views)))).chunk(d))
        pairs = view_pairs(d)
        total = sum(byol_loss(p[i], z[j]) + byol_loss(p[j], z[i]) for i, j in pairs)
        return total / len(pairs)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, for parameters (buffers follow their own BN)."""
        online = list(self.backbone.parameters()) + list(self.head.parameters())
        for t, s in zip(self._target_parameters(), online, strict=True):
            t.lerp_(s, 1.0 - tau)  # t + (1 - tau) * (s - t)

    def on_step(self, step: int, total_steps: int) -> None:
        """EMA update with tau = 1 - (1 - byol_tau) * (cos(pi * step / total_steps) + 1) / 2."""
        self.tau = byol_tau(step, total_steps, self.byol_tau)
        self.update_target(self.tau)
