"""wmse: whitening-based self-supervised representation learning (W-MSE, Ermolov et al., ICML 2021).

Core API::

    import wmse
    z = wmse.whiten(x)                        # x (..., w, D): every slice whitened
    loss = wmse.wmse_loss([h1, h2], w_size=128)
    criterion = wmse.WMSELoss(w_size=128)
"""

from .losses import WMSELoss, byol_loss, nt_xent_loss, wmse_loss
from .whitening import Whitening, fallback_count, whiten

__version__ = "0.1.0"

__all__ = ["whiten", "Whitening", "fallback_count", "wmse_loss", "WMSELoss", "nt_xent_loss", "byol_loss"]
