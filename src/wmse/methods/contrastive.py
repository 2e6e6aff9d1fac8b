"""The contrastive baseline of the W-MSE paper: SimCLR's NT-Xent over every pair of views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..losses import nt_xent_loss
from .base import METHODS, ONE_PROCESS, Method, ProcessContext, check_views, view_pairs

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Contrastive"]


@METHODS.register("contrastive")
class Contrastive(Method):
    """SimCLR NT-Xent over every pair of views, averaged over pairs.

    As in the official baseline the head ends with ``BatchNorm1d(emb)`` (``ProjectionHead(bn_last=True)``).
    """

    title = "Contrastive (SimCLR NT-Xent)"
    citation = ('Chen, Kornblith, Norouzi and Hinton,'
                ' "A Simple Framework for Contrastive Learning of Visual Representations" (SimCLR), ICML 2020')

    @dataclass(frozen=True)
    class Options:
        contrastive_temperature: float = 0.5  # NT-Xent temperature (official --tau)

    run_fields = ("normalize",)
    renamed_fields = {"temperature": "contrastive_temperature"}
    head_bn_last = True

    def __init__(self, backbone: nn.Module, head: nn.Module, normalize: bool = True, **options: Any) -> None:
        super().__init__(backbone, head, **options)
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        self.normalize = normalize

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        if cfg.contrastive_temperature <= 0:
            raise ValueError(f"field 'contrastive_temperature' must be > 0, got {cfg.contrastive_temperature}")

    def _pair_loss(self, z: Sequence[Tensor], anchors: slice | None = None) -> Tensor:
        pairs = view_pairs(len(z))
        t = self.contrastive_temperature
        total = sum(nt_xent_loss(z[i], z[j], t, self.normalize, anchors=anchors) for i, j in pairs)
        return total / len(pairs)

    def loss(self, views: Sequence[Tensor], ctx: ProcessContext = ONE_PROCESS) -> Tensor:
        """Negatives from every process: the embeddings are gathered, and this process computes only its own
        images' rows of the N x 2N logits (the mean over processes is the global loss); in one process, all."""
        check_views(views)
        local = torch.stack(self.embed(views))  # (d, n, D)
        z = ctx.gather(local, 1)  # (d, N, D)
        n = local.shape[1]
        mine = slice(ctx.rank * n, (ctx.rank + 1) * n) if z.shape[1] != n else None
        return self._pair_loss(z, anchors=mine)
