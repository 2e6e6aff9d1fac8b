"""INTL (Weng, Ni, Huang and Lyu, ICLR 2024): IterNorm of the embeddings along the batch axis, MSE between
views plus a trace loss; computed by :func:`wmse.losses.intl_loss` as the authors' code (winci-ai/INTL)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from torch import Tensor

from ..checks import check_min
from ..losses import intl_loss
from .base import METHODS, EmbeddingMethod

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["INTL"]


@METHODS.register("intl")
class INTL(EmbeddingMethod):
    """INTL: every view IterNorm-transformed on its own, each compared with view 0. Under DDP the embeddings
    are gathered first (the authors' IterNorm sees the global batch), so the trace-loss weight's default
    and the gradient are those of the whole batch."""

    title = "INTL"
    citation = ('Weng, Ni, Huang and Lyu, "Modulate Your Spectrum in Self-Supervised Learning", ICLR 2024')

    gather = True  # IterNorm of the whole batch under DDP, as its authors

    @dataclass(frozen=True)
    class Options:
        intl_iters: int = 4  # IterNorm iterations (their --iters)
        intl_trade_off: Optional[float] = None  # trace-loss weight; none: 0.01 * (log2(batch_size) - 3)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        check_min("intl_iters", cfg.intl_iters, 1)
        check_min("intl_trade_off", cfg.intl_trade_off, 0.0)

    def embedding_loss(self, z, generator=None) -> Tensor:
        return intl_loss(z, self.intl_iters, self.intl_trade_off)
