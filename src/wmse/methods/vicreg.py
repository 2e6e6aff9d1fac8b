"""VICReg (Bardes, Ponce and LeCun, ICLR 2022): variance-invariance-covariance regularisation of the
projector outputs of two views, computed by :func:`wmse.losses.vicreg_loss` as facebookresearch/vicreg."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from torch import Tensor

from ..checks import check_min
from ..losses import vicreg_loss
from .base import METHODS, EmbeddingMethod, mean_over_pairs

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["VICReg"]


@METHODS.register("vicreg")
class VICReg(EmbeddingMethod):
    """VICReg over every pair of views (d = 2 in the paper), averaged over pairs.

    Under DDP the views are gathered, as the authors' code does for the variance and covariance terms (their
    invariance term is per process; its mean over processes is the gathered one), so the loss and gradient
    are those of one process on the whole batch.
    """

    title = "VICReg"
    citation = ('Bardes, Ponce and LeCun,'
                ' "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning", ICLR 2022')

    gather = True  # the loss of the whole batch under DDP, as its authors

    @dataclass(frozen=True)
    class Options:
        vicreg_sim_weight: float = 25.0  # invariance (MSE) coefficient (their --sim-coeff)
        vicreg_var_weight: float = 25.0  # variance hinge coefficient (--std-coeff)
        vicreg_cov_weight: float = 1.0  # covariance coefficient (--cov-coeff)

    renamed_fields = {"sim_weight": "vicreg_sim_weight", "var_weight": "vicreg_var_weight",
                      "cov_weight": "vicreg_cov_weight"}

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        for name in ("vicreg_sim_weight", "vicreg_var_weight", "vicreg_cov_weight"):
            check_min(name, getattr(cfg, name), 0.0)

    def embedding_loss(self, z, generator=None) -> Tensor:
        weights = dict(sim_weight=self.vicreg_sim_weight, var_weight=self.vicreg_var_weight,
                       cov_weight=self.vicreg_cov_weight)
        return mean_over_pairs(partial(vicreg_loss, **weights), z)

