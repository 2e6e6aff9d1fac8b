"""Self-supervised losses, one module each: views (or embeddings) in, a scalar out.

Pure functions plus thin nn.Module wrappers; nothing here knows about models or data.
"""

from .byol import byol_loss
from .nt_xent import nt_xent_loss
from .wmse import WMSELoss, pair_mse, wmse_loss

__all__ = ["wmse_loss", "WMSELoss", "pair_mse", "nt_xent_loss", "byol_loss"]
