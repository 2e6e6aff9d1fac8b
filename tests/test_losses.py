"""Losses against naive references written here: the official per-slice loop, SimCLR and BYOL formulas."""

import pytest
import torch
import torch.nn.functional as F

import wmse
from wmse.losses import WMSELoss, byol_loss, nt_xent_loss, wmse_loss


def naive_whiten(v: torch.Tensor) -> torch.Tensor:
    xc = v - v.mean(0)
    cov = xc.T @ xc / (v.shape[0] - 1)
    return xc @ torch.linalg.inv(torch.linalg.cholesky(cov)).T


def naive_wmse(views, w_size, w_iter, seed, normalize=True):
    """The official algorithm as a Python loop: per permutation, per slice, per view; scatter back; pairs."""
    gen = torch.Generator().manual_seed(seed)
    d, N = len(views), views[0].shape[0]
    total, count = 0.0, 0
    for _ in range(w_iter):
        perm = torch.randperm(N, generator=gen)
        z = [torch.zeros_like(v) for v in views]
        for start in range(0, N, w_size):
            idx = perm[start : start + w_size]
            for i in range(d):
                z[i] = z[i].index_put((idx,), naive_whiten(views[i][idx]))
        for i in range(d):
            for j in range(i + 1, d):
                if normalize:
                    total = total + (F.normalize(z[i], dim=1) - F.normalize(z[j], dim=1)).pow(2).sum(1).mean()
                else:
                    total = total + F.mse_loss(z[i], z[j])
                count += 1
    return total / count


def make_views(d, N, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, D, generator=g, dtype=dtype)
    return [(base + 0.5 * torch.randn(N, D, generator=g, dtype=dtype)).requires_grad_() for _ in range(d)]


@pytest.mark.parametrize("d", [2, 4])
@pytest.mark.parametrize("w_iter", [1, 4])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_naive_loop(d, w_iter, normalize):
    views = make_views(d, N=96, D=8, seed=d * 10 + w_iter)
    loss = wmse_loss(views, w_size=32, w_iter=w_iter, normalize=normalize, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(loss, views)
    ref_views = [v.detach().double().requires_grad_() for v in views]
    ref = naive_wmse(ref_views, 32, w_iter, seed=7, normalize=normalize)
    ref_grads = torch.autograd.grad(ref, ref_views)
    assert abs(loss.item() - ref.item()) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g.double(), rg, atol=1e-5), (g.double() - rg).abs().max()


def test_stacked_tensor_equals_list_and_module():
    views = make_views(2, N=64, D=8)
    a = wmse_loss(views, 32, generator=torch.Generator().manual_seed(1))
    b = wmse_loss(torch.stack(views), 32, generator=torch.Generator().manual_seed(1))
    c = WMSELoss(32)(views, generator=torch.Generator().manual_seed(1))
    assert a.item() == b.item() == c.item()


def test_gradcheck_float64():
    views = make_views(3, N=24, D=4, seed=3, dtype=torch.float64)
    for method in ("cholesky", "zca"):
        fn = lambda *v: wmse_loss(list(v), 12, w_iter=2, whitening=method, generator=torch.Generator().manual_seed(0))
        assert torch.autograd.gradcheck(fn, tuple(views))


def test_invariant_to_triangular_affine_map_with_one_slice():
    # With w_size = N, Cholesky whitening removes any map h -> h U + b with U upper triangular and a positive
    # diagonal (its transpose is absorbed by the Cholesky factor), so the loss is unchanged. A general invertible
    # map rotates each view differently and does change it; ZCA is invariant under scaled rotations.
    views = [v.detach().double() for v in make_views(2, N=128, D=8, seed=5)]
    g = torch.Generator().manual_seed(6)
    U = torch.randn(8, 8, generator=g, dtype=torch.float64).triu()
    U.diagonal().copy_(torch.rand(8, generator=g, dtype=torch.float64) + 0.5)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    base = wmse_loss(views, 128)
    assert torch.allclose(wmse_loss([v @ U + b for v in views], 128), base, atol=1e-10)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    zca = wmse_loss(views, 128, whitening="zca")
    assert torch.allclose(wmse_loss([3.0 * v @ Q + b for v in views], 128, whitening="zca"), zca, atol=1e-10)


def test_singular_covariance_gives_finite_loss_and_gradients():
    g = torch.Generator().manual_seed(4)
    collapsed = torch.randn(64, 2, generator=g).repeat(1, 8)  # rank 2 embeddings of size 16
    views = [(collapsed + 0.0 * i).requires_grad_() for i in range(2)]
    wmse.fallback_count(reset=True)  # it warns once per process: count (and warn) anew whatever ran before
    with pytest.warns(RuntimeWarning, match="not positive definite.*diagonal jitter"):  # and the user is told
        loss = wmse_loss(views, 32)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v.grad).all() for v in views)


def test_bf16_autocast_matches_float32():
    views = make_views(2, N=256, D=16, seed=8)
    ref = wmse_loss(views, 64, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin = torch.nn.Linear(16, 16)
        lin.weight.data = torch.eye(16)
        lin.bias.data.zero_()
        low = [lin(v) for v in views]  # bf16 embeddings, as a head under autocast gives
        assert low[0].dtype == torch.bfloat16
        loss = wmse_loss(low, 64, generator=torch.Generator().manual_seed(2))
    assert loss.dtype == torch.float32
    # The only difference is bf16 rounding of the embeddings themselves (3 significant digits).
    exact = wmse_loss([v.to(torch.bfloat16).float() for v in views], 64, generator=torch.Generator().manual_seed(2))
    assert abs(loss.item() - exact.item()) < 1e-3
    assert abs(loss.item() - ref.item()) < 2e-2


@pytest.mark.parametrize(
    "views,kwargs,match",
    [
        ([torch.randn(64, 8)], {}, "at least 2 views"),
        ([torch.randn(64, 8), torch.randn(32, 8)], {}, "same shape"),
        ([torch.randn(64, 8, 1), torch.randn(64, 8, 1)], {}, r"views\[0\]"),
        (torch.randn(64, 8), {}, r"\(d, N, D\)"),
        ([torch.randn(64, 8)] * 2, {"w_size": 128}, "larger than the number of images"),
        ([torch.randn(96, 8)] * 2, {"w_size": 64}, "multiple of w_size"),
        ([torch.randn(64, 40)] * 2, {"w_size": 32}, r"w_size >= 2\*D"),
        ([torch.randn(64, 8)] * 2, {"w_iter": 0}, "w_iter"),
        ([torch.randn(64, 8)] * 2, {"whitening": "svd"}, "whitening"),
    ],
)
def test_bad_arguments(views, kwargs, match):
    kwargs = {"w_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        wmse_loss(views, **kwargs)


def test_method_is_a_deprecated_name_of_whitening():
    views = make_views(2, N=64, D=8, seed=5)
    want = wmse_loss(views, 32, whitening="zca", generator=torch.Generator().manual_seed(0))
    assert not torch.equal(want, wmse_loss(views, 32, generator=torch.Generator().manual_seed(0)))
    with pytest.warns(DeprecationWarning, match=r"wmse_loss\(method=...\) is deprecated"):
        assert torch.equal(wmse_loss(views, 32, method="zca", generator=torch.Generator().manual_seed(0)), want)
    with pytest.warns(DeprecationWarning, match=r"WMSELoss\(method=...\) is deprecated"):
        criterion = WMSELoss(32, method="zca")
    assert criterion.whitening == "zca"
    assert torch.equal(criterion(views, generator=torch.Generator().manual_seed(0)), want)


def naive_nt_xent(z1, z2, t):
    """SimCLR's NT-Xent written per anchor: -log softmax over the 2N - 1 other samples."""
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n = z1.shape[0]
    losses = []
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        sims = torch.stack([z[a] @ z[k] / t for k in range(2 * n) if k != a])
        others = [k for k in range(2 * n) if k != a]
        losses.append(-(sims[others.index(pos)] - torch.logsumexp(sims, 0)))
    return torch.stack(losses).mean()


def test_nt_xent_matches_per_anchor_reference():
    g = torch.Generator().manual_seed(9)
    z1, z2 = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    for t in (0.5, 0.1):
        assert abs(nt_xent_loss(z1, z2, t).item() - naive_nt_xent(z1, z2, t).item()) < 1e-5
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(z1, z2[:5])


def test_nt_xent_over_anchor_slices_averages_to_the_full_loss():
    g = torch.Generator().manual_seed(10)
    z1, z2 = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randn(12, 6, generator=g, dtype=torch.float64)
    full = nt_xent_loss(z1, z2, 0.2)
    parts = [nt_xent_loss(z1, z2, 0.2, anchors=slice(s, s + 4)) for s in (0, 4, 8)]
    torch.testing.assert_close(sum(parts) / 3, full, rtol=1e-6, atol=0)
    assert len({round(p.item(), 6) for p in parts}) == 3  # each slice is its own share
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.2, anchors=slice(0, 12)), full, rtol=0, atol=0)
    for bad in (slice(5, 5), slice(0, 12, 2)):
        with pytest.raises(ValueError, match="anchors"):
            nt_xent_loss(z1, z2, anchors=bad)


def test_byol_loss_is_normalized_mse():
    g = torch.Generator().manual_seed(10)
    p, z = torch.randn(20, 7, generator=g), torch.randn(20, 7, generator=g)
    ref = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    assert abs(byol_loss(p, z).item() - ref.item()) < 1e-6
    assert byol_loss(p, p).abs().item() < 1e-6


def test_public_names():
    assert wmse.wmse_loss is wmse_loss and wmse.WMSELoss is WMSELoss


def test_nt_xent_and_byol_keep_float64_inputs_in_float64():
    """A float64 check of a loss (the distributed gradient tests) needs the loss itself in float64: in float32
    the gradients of an AVX-512 and an AVX2 CPU differ by ~3e-5 relative."""
    g = torch.Generator().manual_seed(9)
    z1, z2 = (torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    loss = nt_xent_loss(z1, z2, temperature=0.5)
    assert loss.dtype == torch.float64 and byol_loss(z1, z2).dtype == torch.float64
    a, b = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    z = torch.cat([a, b])  # naive float64 NT-Xent: 2N anchors, each positive the other view, self excluded
    sim = z @ z.T / 0.5
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(12, 24), torch.arange(12)])
    ref = torch.nn.functional.cross_entropy(sim, target)
    assert abs(float(loss) - float(ref)) < 1e-12
    ga = torch.autograd.grad(loss, z1, retain_graph=True)[0]
    gr = torch.autograd.grad(ref, z1)[0]
    torch.testing.assert_close(ga, gr, rtol=1e-10, atol=1e-12)
