"""CW-RGP (Weng, Huang, Yang, Zhao and Lyu, NeurIPS 2022): channel whitening (along the batch axis) within
random group partitions of the embedding channels, normalised MSE between views; computed by
:func:`wmse.losses.cwrgp_loss` as the authors' code (winci-ai/CW-RGP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..checks import check_min
from ..losses import cwrgp_loss
from .base import METHODS, EmbeddingMethod
from .wmse import SliceOptions

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["CWRGP"]


@METHODS.register("cwrgp")
class CWRGP(EmbeddingMethod):
    """CW-RGP: slices of ``w_size`` images (as W-MSE), each whitened against each other per group of
    ``emb / cw_groups`` channels. Each process whitens its own slices under DDP, as the authors' code."""

    title = "CW-RGP"
    citation = ('Weng, Huang, Yang, Zhao and Lyu,'
                ' "An Investigation into Whitening Loss for Self-supervised Learning", NeurIPS 2022')

    @dataclass(frozen=True)
    class Options(SliceOptions):  # W-MSE's w_size, w_iter and w_eps (same meaning), and its own:
        cw_groups: int = 4  # channel groups whitened separately (their CIFAR runs: 4 of D = 512)

    run_fields = ("normalize",)

    def __init__(self, backbone: nn.Module, head: nn.Module, normalize: bool = True, **options: Any) -> None:
        super().__init__(backbone, head, **options)
        self.normalize = normalize

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        check_min("cw_groups", cfg.cw_groups, 1)
        check_min("w_iter", cfg.w_iter, 1)
        if cfg.batch_size % cfg.w_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of w_size ({cfg.w_size})")
        if cfg.emb % cfg.cw_groups or cfg.emb // cfg.cw_groups <= cfg.w_size:
            raise ValueError(f"CW-RGP whitens groups of emb / cw_groups channels against w_size images: need emb "
                             f"({cfg.emb}) a multiple of cw_groups ({cfg.cw_groups}) and emb / cw_groups > w_size "
                             f"({cfg.w_size}) (their CIFAR runs: emb 512, cw_groups 4, w_size 64)")
        if not 0.0 <= cfg.w_eps < 1.0:
            raise ValueError(f"field 'w_eps' must be in [0, 1), got {cfg.w_eps}")

    @classmethod
    def check_processes(cls, cfg: Config, world_size: int) -> None:
        local = cfg.batch_size // world_size
        if local % cfg.w_size:
            raise ValueError(f"per-process batch batch_size/nproc = {local} is not a multiple of w_size "
                             f"({cfg.w_size}): each process whitens its own slices")

    def embedding_loss(self, z, generator=None) -> Tensor:
        return cwrgp_loss(z, self.w_size, self.cw_groups, self.w_iter, self.w_eps, self.normalize, generator=generator)

