"""W-MSE (Ermolov et al., ICML 2021): whiten each view's embeddings in slices of ``w_size`` images, then
the MSE of the normalised whitened views of one image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checks import check_min
from ..losses import wmse_loss
from ..whitening import WHITENINGS
from .base import METHODS, EmbeddingMethod

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["WMSE", "SliceOptions"]


@dataclass(frozen=True)
class SliceOptions:
    """The fields of a method that whitens random slices of ``w_size`` images (W-MSE, CW-RGP)."""

    w_size: int = 128  # images per whitening slice
    w_iter: int = 1  # repetitions of random slicing per step
    w_eps: float = 0.0  # covariance shrinkage towards identity


@METHODS.register("wmse")
class WMSE(EmbeddingMethod):
    """W-MSE: whiten each view's embeddings in slices of ``w_size`` images, then MSE between views.

    ``n_views`` is d (2 or 4); the batch size N must be a multiple of ``w_size`` and ``w_size`` must
    exceed the embedding size (``w_size >= 2 * emb`` recommended).
    """

    title = "W-MSE"
    citation = ('Ermolov, Siarohin, Sangineto and Sebe,'
                ' "Whitening for Self-Supervised Representation Learning", ICML 2021')

    @dataclass(frozen=True)
    class Options(SliceOptions):
        w_whitening: str = "cholesky"  # a name of wmse.whitening.WHITENINGS: cholesky (paper) | zca | newton_schulz
        w_global: bool = False  # DDP: whiten the gathered global batch instead of per-process slices

    run_fields = ("n_views", "normalize")
    renamed_fields = {"whitening": "w_whitening", "whiten_global": "w_global"}

    def __init__(self, backbone: nn.Module, head: nn.Module, n_views: int = 2, normalize: bool = True,
                 **options: Any) -> None:
        super().__init__(backbone, head, **options)
        if n_views < 2:
            raise ValueError(f"n_views must be >= 2 (W-MSE compares views of one image), got {n_views}")
        if self.w_iter < 1:
            raise ValueError(f"w_iter must be >= 1, got {self.w_iter}")
        self.n_views, self.normalize = n_views, normalize

    @property
    def gather(self) -> bool:  # type: ignore[override]
        """Under DDP: slices of the gathered global batch from one shared permutation (the single-process loss
        of the whole batch) with ``w_global``, else (the default) per-process slices of the local images."""
        return self.w_global

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        if cfg.w_whitening not in WHITENINGS.names():
            raise ValueError(f"field 'w_whitening': unknown whitening {cfg.w_whitening!r}; "
                             f"choose one of {', '.join(WHITENINGS.names())}")
        if cfg.w_size > cfg.batch_size:
            raise ValueError(
                f"w_size ({cfg.w_size}) is larger than batch_size ({cfg.batch_size}); "
                "use w_size <= batch_size (a whitening slice takes w_size images of one batch)"
            )
        if cfg.batch_size % cfg.w_size != 0:
            raise ValueError(
                f"batch_size ({cfg.batch_size}) must be a multiple of w_size ({cfg.w_size}); "
                f"e.g. batch_size={max(1, cfg.batch_size // cfg.w_size) * cfg.w_size}"
            )
        if cfg.w_size <= cfg.emb:
            raise ValueError(
                f"w_size ({cfg.w_size}) must be larger than emb ({cfg.emb}) or the covariance is singular; "
                f"w_size >= 2*emb ({2 * cfg.emb}) is recommended"
            )
        check_min("w_iter", cfg.w_iter, 1)
        if not 0.0 <= cfg.w_eps < 1.0:
            raise ValueError(f"field 'w_eps' must be in [0, 1), got {cfg.w_eps}")

    @classmethod
    def check_processes(cls, cfg: Config, world_size: int) -> None:
        local = cfg.batch_size // world_size
        if not cfg.w_global and local % cfg.w_size:
            raise ValueError(
                f"per-process batch batch_size/nproc = {cfg.batch_size}/{world_size} = {local} is not a multiple "
                f"of w_size ({cfg.w_size}): each process whitens its own slices. Use batch_size = nproc * k * "
                f"w_size (e.g. {world_size * cfg.w_size}), a smaller w_size, or --w_global true to whiten "
                "the gathered global batch"
            )

    @classmethod
    def nonfinite_hints(cls, cfg: Config) -> list[str]:
        hints = []
        if cfg.w_size < 2 * cfg.emb:
            hints.append(f"w_size ({cfg.w_size}) below 2*emb ({2 * cfg.emb}): each covariance is estimated from "
                         "few samples (raise --w_size)")
        if cfg.w_eps == 0.0:
            hints.append("collapsed embeddings with no covariance shrinkage (try --w_eps 1e-4)")
        return hints

    def loss_from_embeddings(
        self, emb: Sequence[Tensor] | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """W-MSE loss of d embeddings (N, emb) of the same N images, or one (d, N, emb) tensor.

        ``generator`` draws the slice permutations (None: the global RNG).
        """
        views = emb if isinstance(emb, Tensor) else list(emb)
        return wmse_loss(views, self.w_size, self.w_iter, self.w_eps, self.normalize, self.w_whitening, generator)

    embedding_loss = loss_from_embeddings
