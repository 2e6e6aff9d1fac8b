"""Self-supervised losses, one module each: views (or embeddings) in, a scalar out.

Pure functions plus thin nn.Module wrappers; nothing here knows about models or data.
"""

from .barlow_twins import barlow_twins_loss
from .byol import byol_loss
from .cwrgp import cwrgp_loss
from .dbn import dbn_loss
from .intl import intl_loss
from .nt_xent import nt_xent_loss
from .vicreg import vicreg_loss
from .wmse import WMSELoss, pair_mse, wmse_loss

__all__ = ["wmse_loss", "WMSELoss", "pair_mse", "nt_xent_loss", "byol_loss",
           "vicreg_loss", "barlow_twins_loss", "cwrgp_loss", "intl_loss", "dbn_loss"]
