"""Whitening against independent references: float64 naive per-slice code, autograd, gradcheck."""

import warnings

import pytest
import torch

import wmse
from wmse.whitening import Whitening, fallback_count, whiten


def naive_cholesky_whiten(v: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """One (w, D) slice in float64, written from the paper's formula with an explicit inverse."""
    v = v.double()
    w, D = v.shape
    xc = v - v.mean(0)
    cov = xc.T @ xc / (w - 1)
    cov = (1 - eps) * cov + eps * torch.eye(D, dtype=torch.float64)
    L = torch.linalg.cholesky(cov)
    return (torch.linalg.inv(L) @ xc.T).T


def cov_of(z: torch.Tensor) -> torch.Tensor:
    zc = z - z.mean(-2, keepdim=True)
    return zc.mT @ zc / (z.shape[-2] - 1)


@pytest.fixture
def slices():
    g = torch.Generator().manual_seed(0)
    # Correlated features so the whitening has real work to do, yet a condition number (~30) at which
    # float32 can reach 1e-4 (a random Gaussian mix has ~1e4 and float32 rounding alone then gives 1e-3).
    mix = torch.eye(16) + 0.2 * torch.randn(16, 16, generator=g)
    return torch.randn(3, 5, 128, 16, generator=g) @ mix


@pytest.mark.parametrize("method", ["cholesky", "zca", "newton_schulz"])
def test_identity_covariance(slices, method):
    z = whiten(slices, whitening=method)
    assert z.shape == slices.shape and z.dtype == torch.float32
    eye = torch.eye(16).expand(3, 5, 16, 16)
    assert torch.allclose(cov_of(z), eye, atol=1e-4), (cov_of(z) - eye).abs().max()
    assert z.mean(-2).abs().max() < 1e-4


def test_cholesky_matches_float64_naive(slices):
    z = whiten(slices)
    for idx in [(0, 0), (1, 3), (2, 4)]:
        ref = naive_cholesky_whiten(slices[idx])
        assert torch.allclose(z[idx].double(), ref, atol=1e-4, rtol=1e-4)
    z64 = whiten(slices.double(), eps=0.1)
    assert z64.dtype == torch.float64
    assert torch.allclose(z64[1, 2], naive_cholesky_whiten(slices[1, 2], eps=0.1), atol=1e-10)


def test_zca_is_symmetric_and_newton_schulz_converges_to_it(slices):
    x = slices.double()
    zca = whiten(x, whitening="zca")
    ns = whiten(x, whitening="newton_schulz", ns_iters=30)
    assert torch.allclose(ns, zca, atol=1e-6)
    # ZCA is the whitening closest to the input: W = C^{-1/2} is symmetric.
    xc = x - x.mean(-2, keepdim=True)
    W = torch.linalg.lstsq(xc[0, 0], zca[0, 0]).solution
    assert torch.allclose(W, W.T, atol=1e-8)


def test_grad_matches_autograd_through_naive(slices):
    x = slices[0, :2].double().requires_grad_()
    weights = torch.randn_like(x)
    (whiten(x) * weights).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.stack([naive_cholesky_whiten(s) for s in x_ref])
    (ref * weights).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-9)


@pytest.mark.parametrize("method,eps", [("cholesky", 0.0), ("cholesky", 0.2), ("zca", 0.0), ("newton_schulz", 0.0)])
def test_gradcheck(method, eps):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: whiten(a, whitening=method, eps=eps, ns_iters=25), (x,))


def test_autocast_bf16_computes_in_float32(slices):
    x = slices[0].to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = whiten(x)
    assert z.dtype == torch.bfloat16
    ref = whiten(x.float())
    assert torch.allclose(z.float(), ref, atol=3e-2, rtol=1e-2)


def test_singular_covariance_is_finite_and_counted():
    fallback_count(reset=True)
    g = torch.Generator().manual_seed(2)
    few_rows = torch.randn(4, 8, 16, generator=g, requires_grad=True)  # w <= D
    duplicated = torch.randn(1, 32, 8, generator=g).repeat(1, 1, 2)  # two identical feature halves
    collapsed = torch.ones(1, 32, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in (few_rows, duplicated, collapsed):
            for method in ("cholesky", "zca", "newton_schulz"):
                z = whiten(x, whitening=method)
                assert torch.isfinite(z).all(), method
        whiten(few_rows).sum().backward()
    assert torch.isfinite(few_rows.grad).all()
    assert fallback_count() >= 4 + 1 + 1
    assert any("not positive definite" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [((5,), {}, "at least 2 dimensions"), ((1, 4), {}, "at least 2 rows"), ((8, 4), {"whitening": "pca"}, "whitening")],
)
def test_bad_arguments(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        whiten(torch.randn(shape), **kwargs)


def test_whitening_module_running_stats():
    g = torch.Generator().manual_seed(3)
    mix = torch.eye(6) + 0.3 * torch.randn(6, 6, generator=g)
    layer = Whitening(6, momentum=0.5)
    for _ in range(20):
        x = torch.randn(4, 64, 6, generator=g) @ mix + 3.0
        z = layer(x)
        assert torch.allclose(cov_of(z), torch.eye(6).expand(4, 6, 6), atol=1e-4)
    true_cov = mix.T @ mix
    assert torch.allclose(layer.running_mean, torch.full((6,), 3.0), atol=0.5)
    assert torch.allclose(layer.running_cov, true_cov, rtol=0.3, atol=0.3)
    layer.eval()
    big = torch.randn(20000, 6, generator=g) @ mix + 3.0
    z = layer(big)
    assert torch.allclose(cov_of(z), torch.eye(6), atol=0.2)
    assert z.mean(0).abs().max() < 0.2
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(10, 5))


def test_public_names():
    assert wmse.whiten is whiten and wmse.Whitening is Whitening


def test_method_is_a_deprecated_name_of_whitening():
    """``method=`` (the former name of the operator) still works, warns, and gives what ``whitening=`` gives."""
    x = torch.randn(2, 32, 4, generator=torch.Generator().manual_seed(4))
    with pytest.warns(DeprecationWarning, match=r"whiten\(method=...\) is deprecated.*whitening="):
        old = whiten(x, method="zca")
    assert torch.equal(old, whiten(x, whitening="zca")) and not torch.equal(old, whiten(x))
    with pytest.warns(DeprecationWarning, match="Whitening"):
        assert Whitening(4, method="zca").whitening == "zca"
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="give only whitening="):
        whiten(x, whitening="newton_schulz", method="zca")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns nothing
        whiten(x, whitening="zca")
        Whitening(4, whitening="zca")
