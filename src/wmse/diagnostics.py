"""Collapse diagnostics for learned representations.

All functions take plain tensors and return Python floats or float64 tensors, so the training
loop can log them as JSON lines and ``wmse evaluate`` / ``wmse report`` can show them.

- :func:`spectrum`: eigenvalues of the covariance of a set of vectors, descending.
- :func:`effective_rank`: exp of the Shannon entropy of the normalised eigenvalues
  (Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007).
  D for an isotropic cloud in D dimensions, 1 for a cloud on a line.
- :func:`normalized_std`: mean over dimensions of the std of ``z / |z|``. For embeddings spread
  over the sphere it is about ``1/sqrt(D)``; it goes to 0 when all embeddings collapse onto one
  direction (the indicator used by SimSiam, Chen & He 2021).
- :func:`embedding_diagnostics`: all of the above for encoder features and head embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["spectrum", "effective_rank", "normalized_std", "embedding_diagnostics", "nonfinite_rows"]


def _check_2d(x: Tensor, name: str, min_rows: int = 2) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(
            f"{name} needs at least {min_rows} rows (samples) for a covariance, got {x.shape[0]}"
        )


def spectrum(x: Tensor) -> Tensor:
    """Eigenvalues of the sample covariance of ``x``, in descending order.

    Args:
        x: ``(N, D)`` samples in rows, any float dtype and device.

    Returns:
        ``(D,)`` float64 CPU tensor. Computed in float64 (the covariance of features with a large
        mean loses its small eigenvalues in float32). Tiny negative values from rounding are kept
        as they are; :func:`effective_rank` clamps them.
    """
    _check_2d(x, "x")
    x64 = x.detach().to(device="cpu", dtype=torch.float64)
    xc = x64 - x64.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / (x64.shape[0] - 1)
    # eigvalsh returns ascending eigenvalues of the symmetric matrix.
    return torch.linalg.eigvalsh(cov).flip(0)


def effective_rank(eigs: Tensor) -> float:
    """Effective rank ``exp(H(p))`` with ``p = eigs / sum(eigs)`` (Roy & Vetterli 2007).

    Args:
        eigs: ``(D,)`` eigenvalues (or singular values' squares), any order; negatives from
            rounding are clamped to 0.

    Returns:
        A float in ``[1, D]``, or ``0.0`` when every eigenvalue is 0 (fully collapsed input,
        where the measure is undefined).
    """
    if eigs.ndim != 1 or eigs.numel() == 0:
        raise ValueError(f"eigs must be a non-empty 1-D tensor, got shape {tuple(eigs.shape)}")
    e = eigs.detach().to(dtype=torch.float64).clamp_min(0.0)
    total = e.sum()
    if total <= 0:
        return 0.0
    p = e / total
    # 0 * log 0 = 0: xlogy handles it without producing NaN.
    entropy = -torch.special.xlogy(p, p).sum()
    return float(torch.exp(entropy))


def normalized_std(z: Tensor) -> float:
    """Mean over dimensions of the std (over samples) of the L2-normalised rows of ``z``.

    Args:
        z: ``(N, D)`` embeddings.

    Returns:
        About ``1/sqrt(D)`` for embeddings spread over the sphere, near 0 for collapse.
    """
    _check_2d(z, "z")
    zn = torch.nn.functional.normalize(z.detach().to(dtype=torch.float64), dim=1)
    return float(zn.std(dim=0, unbiased=True).mean())


def _summary(x: Tensor, prefix: str) -> dict[str, float | list[float]]:
    bad = nonfinite_rows(x)
    if bad:  # no covariance of non-finite values: say so instead
        return {f"{prefix}_nonfinite_rows": bad}
    eigs = spectrum(x)
    total = float(eigs.clamp_min(0).sum())
    dim = x.shape[1]
    nstd = normalized_std(x)
    return {
        f"{prefix}_eff_rank": effective_rank(eigs),
        f"{prefix}_top_eig_share": float(eigs[0].clamp_min(0)) / total if total > 0 else 1.0,
        f"{prefix}_norm_std": nstd,
        # normalized_std * sqrt(D): about 1 when healthy, whatever D is.
        f"{prefix}_norm_std_ratio": nstd * math.sqrt(dim),
        f"spectrum_{prefix}s": [float(v) for v in eigs],
    }


def embedding_diagnostics(features: Tensor, embeddings: Tensor | None = None) -> dict:
    """Collapse indicators of encoder features ``E(x)`` and head embeddings ``g(E(x))``.

    Args:
        features: ``(N, F)`` encoder outputs (512-d for ResNet-18).
        embeddings: ``(N, D)`` head outputs for the same N images, or None to skip them.

    Returns:
        A JSON-serialisable dict. Floats: ``feature_eff_rank``, ``feature_top_eig_share``,
        ``feature_norm_std``, ``feature_norm_std_ratio`` and the same with the ``emb_`` prefix
        when embeddings are given. Lists (for plots): ``spectrum_features`` ``(F,)`` and
        ``spectrum_embeddings`` ``(D,)``, eigenvalues in descending order. Rows that are not finite
        (a diverged encoder) have no spectrum: then the dict holds ``feature_nonfinite_rows`` (and
        ``emb_nonfinite_rows``), the number of such rows, instead of that set's entries.
    """
    _check_2d(features, "features")
    out = _summary(features, "feature")
    if embeddings is not None:
        _check_2d(embeddings, "embeddings")
        if embeddings.shape[0] != features.shape[0]:
            raise ValueError(
                f"embeddings has {embeddings.shape[0]} rows but features has "
                f"{features.shape[0]}: pass both for the same images"
            )
        emb = _summary(embeddings, "emb")
        if "spectrum_embs" in emb:
            emb["spectrum_embeddings"] = emb.pop("spectrum_embs")
        out.update(emb)
    return out


def nonfinite_rows(x: Tensor) -> int:
    """How many rows of ``x`` (N, D) hold a NaN or an infinity."""
    return int((~torch.isfinite(x)).any(dim=1).sum())
