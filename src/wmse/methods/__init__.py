"""Self-supervised methods, one module each, registered by name in :data:`METHODS`.

Adding a method: a module here (or anywhere) with a :class:`Method` subclass (or :class:`EmbeddingMethod`, for
a loss of the embeddings alone) decorated with ``@METHODS.register("name")``; its config fields are declared
once, in its nested ``Options`` dataclass. Nothing else changes: the config, the CLI, the training loop and
multi-process training read the registry.
"""

from typing import TYPE_CHECKING

from .base import (METHODS, ONE_PROCESS, EmbeddingMethod, Method, ProcessContext, check_views, mean_over_pairs,
                   step_generator, view_pairs)

# Imported in the order users see the methods listed (the registry keeps registration order).
from .wmse import WMSE  # isort: skip
from .contrastive import Contrastive  # isort: skip
from .byol import BYOL, byol_tau  # isort: skip
from .cwrgp import CWRGP  # isort: skip
from .intl import INTL  # isort: skip
from .dbn import ShuffledDBN  # isort: skip
from .vicreg import VICReg  # isort: skip
from .barlow_twins import BarlowTwins  # isort: skip

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["METHODS", "Method", "EmbeddingMethod", "ProcessContext", "ONE_PROCESS", "WMSE", "Contrastive", "BYOL",
           "CWRGP", "INTL", "ShuffledDBN", "VICReg", "BarlowTwins", "build_method", "byol_tau", "check_views",
           "mean_over_pairs", "step_generator", "view_pairs"]


def build_method(cfg: "Config", in_channels: int) -> Method:
    """The method named ``cfg.method`` with fresh weights; ``in_channels`` comes from the data (1 or 3)."""
    from ..models import build_backbone

    cls = METHODS.get(cfg.method, "method")
    return cls.from_config(cfg, build_backbone(cfg.arch, cfg.image_size, in_channels))
