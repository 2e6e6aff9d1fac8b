"""Shuffled-DBN (Hua, Wang, Xue, Ren, Wang and Zhao, ICCV 2021): shuffle the embedding channels, ZCA-whiten
each group over the batch (decorrelated batch norm), MSE between views; computed by
:func:`wmse.losses.dbn_loss` as the authors' code (PatrickHua/FeatureDecorrelationSSL)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Optional

from torch import Tensor

from ..checks import check_min
from ..losses import dbn_loss
from .base import METHODS, EmbeddingMethod, mean_over_pairs

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["ShuffledDBN"]


@METHODS.register("dbn")
class ShuffledDBN(EmbeddingMethod):
    """Shuffled-DBN over every pair of views (d = 2 in the paper). Each process whitens its own batch under
    DDP, as the authors' code."""

    title = "Shuffled-DBN"
    citation = ('Hua, Wang, Xue, Ren, Wang and Zhao,'
                ' "On Feature Decorrelation in Self-Supervised Learning", ICCV 2021')

    @dataclass(frozen=True)
    class Options:
        dbn_groups: Optional[int] = 16  # channel groups (their configs: 16); none: ceil(2 * emb / batch)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        check_min("dbn_groups", cfg.dbn_groups, 1)
        groups = cfg.dbn_groups or math.ceil(2 * cfg.emb / cfg.batch_size)
        if cfg.emb % groups or cfg.emb // groups >= cfg.batch_size:
            raise ValueError(f"Shuffled-DBN whitens groups of emb / dbn_groups channels over the batch: need emb "
                             f"({cfg.emb}) a multiple of dbn_groups ({groups}) and emb / dbn_groups < batch_size "
                             f"({cfg.batch_size})")

    def embedding_loss(self, z, generator=None) -> Tensor:
        return mean_over_pairs(partial(dbn_loss, num_groups=self.dbn_groups, generator=generator), z)

