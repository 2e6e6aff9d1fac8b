"""wmse.diagnostics against numpy float64 eigenvalues and spectra with known effective rank."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from wmse.diagnostics import effective_rank, embedding_diagnostics, normalized_std, spectrum


def test_spectrum_equals_numpy_eigvalsh() -> None:
    g = torch.Generator().manual_seed(0)
    # Correlated features with a large mean, as post-ReLU encoder outputs have.
    x = (torch.randn(300, 20, generator=g) @ torch.randn(20, 20, generator=g) + 5.0).float()
    ours = spectrum(x)
    ref = np.sort(np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False)))[::-1]
    assert ours.dtype == torch.float64 and ours.shape == (20,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-10)
    assert torch.all(ours[:-1] >= ours[1:])  # descending


def test_effective_rank_of_known_spectra() -> None:
    assert effective_rank(torch.ones(64)) == pytest.approx(64.0)  # identity -> D
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0)  # rank 1
    assert effective_rank(torch.tensor([2.0, 2.0, 0.0, -1e-12])) == pytest.approx(2.0)
    p = torch.tensor([0.5, 0.25, 0.25])  # exp(entropy) by hand
    assert effective_rank(p * 7) == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25))))
    assert effective_rank(torch.zeros(5)) == 0.0  # fully collapsed: defined as 0
    with pytest.raises(ValueError, match="1-D"):
        effective_rank(torch.ones(2, 2))


def test_effective_rank_of_data_spans_its_subspace() -> None:
    g = torch.Generator().manual_seed(1)
    iso = torch.randn(20000, 8, generator=g)
    assert effective_rank(spectrum(iso)) == pytest.approx(8.0, rel=0.01)
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert effective_rank(spectrum(line)) == pytest.approx(1.0, abs=1e-6)


def test_normalized_std_healthy_and_collapsed() -> None:
    g = torch.Generator().manual_seed(2)
    d = 64
    healthy = normalized_std(torch.randn(20000, d, generator=g))
    assert healthy == pytest.approx(1 / math.sqrt(d), rel=0.02)
    collapsed = torch.randn(1, d, generator=g) + 1e-4 * torch.randn(1000, d, generator=g)
    assert normalized_std(collapsed) < 1e-3
    # Naive reference: per-dimension std of unit rows.
    z = torch.randn(50, 5, generator=g, dtype=torch.float64)
    zn = (z / z.norm(dim=1, keepdim=True)).numpy()
    assert normalized_std(z) == pytest.approx(float(np.mean(np.std(zn, axis=0, ddof=1))))


def test_embedding_diagnostics_is_json_ready() -> None:
    g = torch.Generator().manual_seed(3)
    feats, embs = torch.rand(400, 32, generator=g), torch.randn(400, 8, generator=g)
    diag = embedding_diagnostics(feats, embs)
    json.dumps(diag)  # only plain floats and lists
    assert len(diag["spectrum_features"]) == 32 and len(diag["spectrum_embeddings"]) == 8
    assert diag["emb_eff_rank"] == pytest.approx(effective_rank(spectrum(embs)))
    assert diag["feature_top_eig_share"] == pytest.approx(float(spectrum(feats)[0] / spectrum(feats).sum()))
    assert diag["emb_norm_std_ratio"] == pytest.approx(normalized_std(embs) * math.sqrt(8))
    assert "emb_eff_rank" not in embedding_diagnostics(feats)
    with pytest.raises(ValueError, match="rows"):
        embedding_diagnostics(feats, embs[:10])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        spectrum(torch.ones(3))
