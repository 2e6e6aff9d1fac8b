"""Normalize's per-channel statistics, shared by the training and the evaluation views."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _stats_tensor(values: Sequence[float], channels: int, device: torch.device, name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values for {channels}-channel images")
    return t.view(1, channels, 1, 1)
