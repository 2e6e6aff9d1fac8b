"""Barlow Twins (Zbontar et al., ICML 2021): the cross-correlation of two views' batch-standardised projector
outputs pulled to the identity, computed by :func:`wmse.losses.barlow_twins_loss` as facebookresearch/barlowtwins."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from torch import Tensor

from ..checks import check_min
from ..losses import barlow_twins_loss
from .base import METHODS, EmbeddingMethod, mean_over_pairs

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["BarlowTwins"]


@METHODS.register("barlow")
class BarlowTwins(EmbeddingMethod):
    """Barlow Twins over every pair of views (d = 2 in the paper), averaged over pairs.

    Under DDP the embeddings are gathered and the loss is that of the whole batch, so the gradient is the
    single-process one. (The authors all-reduce the cross-correlation with a raw ``all_reduce`` that autograd
    does not see, which scales their gradient by 1 / world_size; the value is the same.)
    """

    title = "Barlow Twins"
    citation = ('Zbontar, Jing, Misra, LeCun and Deny,'
                ' "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021')

    gather = True  # the loss of the whole batch under DDP, as its authors

    @dataclass(frozen=True)
    class Options:
        barlow_lambd: float = 0.0051  # weight of the off-diagonal terms (their --lambd)

    renamed_fields = {"lambd": "barlow_lambd"}

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        check_min("barlow_lambd", cfg.barlow_lambd, 0.0)

    def embedding_loss(self, z, generator=None) -> Tensor:
        return mean_over_pairs(partial(barlow_twins_loss, lambd=self.barlow_lambd), z)

