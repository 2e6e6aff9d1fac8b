"""The whitening family's losses against naive float64 references written here from the authors' code's math
(loops and plain torch ops, nothing from wmse): VICReg, Barlow Twins, CW-RGP, INTL, Shuffled-DBN.

Exactness tests run in float64 (each loss keeps float64 input in float64), so no tolerance depends on one CPU's
float32 kernels.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import wmse.losses
from wmse.losses import barlow_twins_loss, cwrgp_loss, dbn_loss, intl_loss, vicreg_loss
from wmse.losses.barlow_twins import barlow_twins_cross_correlation, barlow_twins_objective
from wmse.losses.intl import default_trade_off
from wmse.losses.vicreg import vicreg_terms
from wmse.whitening import zca_matrix

f64 = torch.float64


def make_views(d, N, D, seed=0, dtype=f64, noise=0.5):
    """d correlated views of N images, leaf tensors that require grad."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(D, dtype=dtype) + 0.3 * torch.randn(D, D, generator=g, dtype=dtype)
    base = torch.randn(N, D, generator=g, dtype=dtype) @ mix
    return [(base + noise * torch.randn(N, D, generator=g, dtype=dtype)).requires_grad_() for _ in range(d)]


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def assert_matches(loss, ref, inputs, ref_inputs, rtol=1e-9, atol=1e-10):
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=rtol, atol=atol)
    for g, rg in zip(grads(loss, inputs), grads(ref, ref_inputs)):
        torch.testing.assert_close(g, rg, rtol=1e-7, atol=1e-10)


def detached(views):
    return [v.detach().clone().requires_grad_() for v in views]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def naive_zca(cov):
    """C^{-1/2} from eigh, float64, no floor (healthy covariances only)."""
    evals, evecs = torch.linalg.eigh(cov)
    return evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def rotation_fixing_ones(D, seed):
    """A random orthogonal D x D matrix Q with 1 Q = 1: it commutes with centring each row over its channels."""
    g = gen(seed)
    spanning = torch.cat([torch.ones(D, 1, dtype=f64), torch.randn(D, D - 1, generator=g, dtype=f64)], 1)
    basis, _ = torch.linalg.qr(spanning)  # first column along the all-ones direction
    R, _ = torch.linalg.qr(torch.randn(D - 1, D - 1, generator=g, dtype=f64))
    inner = torch.block_diag(torch.ones(1, 1, dtype=f64), R)
    return basis @ inner @ basis.T


# ----------------------------------------------------------------------------------------------- VICReg

def naive_vicreg(x, y, sim=25.0, var=25.0, cov=1.0, eps=1e-4):
    """main_vicreg.py's forward written with loops over channels."""
    N, D = x.shape
    inv = ((x - y) ** 2).sum() / (N * D)
    std_terms = []
    cov_terms = []
    for z in (x, y):
        zc = z - z.sum(0) / N
        std = [torch.sqrt((zc[:, c] ** 2).sum() / (N - 1) + eps) for c in range(D)]
        std_terms.append(sum(torch.clamp(1 - s, min=0) for s in std) / D)
        off = 0.0
        for i in range(D):
            for j in range(D):
                if i != j:
                    off = off + ((zc[:, i] * zc[:, j]).sum() / (N - 1)) ** 2
        cov_terms.append(off / D)
    return sim * inv + var * (std_terms[0] / 2 + std_terms[1] / 2) + cov * (cov_terms[0] + cov_terms[1])


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_vicreg_matches_naive(weights):
    # Scaled so that some channels have std < 1 (hinge active) and some > 1 (hinge off).
    x, y = make_views(2, N=24, D=6, seed=1)
    scale = torch.tensor([0.3, 0.5, 0.8, 1.5, 2.0, 0.1], dtype=f64)
    xs, ys = (x * scale).detach().requires_grad_(), (y * scale).detach().requires_grad_()
    loss = vicreg_loss(xs, ys, *weights)
    rx, ry = detached([xs, ys])
    assert_matches(loss, naive_vicreg(rx, ry, *weights), (xs, ys), (rx, ry))


def test_vicreg_invariances():
    x, y = [v.detach() for v in make_views(2, N=32, D=6, seed=2)]
    base = vicreg_loss(x, y)
    perm = torch.randperm(32, generator=gen(0))
    torch.testing.assert_close(vicreg_loss(x[perm], y[perm]), base, rtol=1e-12, atol=0)  # batch order
    b = torch.randn(6, dtype=f64)
    torch.testing.assert_close(vicreg_loss(x + b, y + b), base, rtol=1e-12, atol=0)  # a shift of both views
    torch.testing.assert_close(vicreg_loss(y, x), base, rtol=1e-12, atol=0)  # symmetric in the views
    # Variance and covariance are batch statistics of each branch: blind to each view's own shift.
    _, var, cov = vicreg_terms(x, y)
    _, var2, cov2 = vicreg_terms(x + 3.0, y - torch.randn(6, dtype=f64))
    torch.testing.assert_close((var2, cov2), (var, cov), rtol=1e-12, atol=1e-14)


def test_vicreg_code_semantics_halved_std_summed_cov():
    N, D = 64, 4
    g = gen(3)
    collapsed = torch.zeros(N, D, dtype=f64)  # variance 0: std = sqrt(eps)
    wide = 3.0 * torch.randn(N, D, generator=g, dtype=f64)  # std well above 1: no hinge
    inv, var, cov = vicreg_terms(collapsed, wide)
    # The code's / 2: the collapsed branch contributes (1 - sqrt(eps)) / 2, not 1 - sqrt(eps) (the paper's sum).
    torch.testing.assert_close(var, torch.tensor((1 - math.sqrt(1e-4)) / 2, dtype=f64), rtol=1e-12, atol=0)
    # Covariance: each branch's off-diagonal squares / D, summed (not averaged) over the branches.
    wc = wide - wide.mean(0)
    C = wc.T @ wc / (N - 1)
    expected = ((C ** 2).sum() - (C.diagonal() ** 2).sum()) / D
    torch.testing.assert_close(cov, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(vicreg_terms(wide, wide)[2], 2 * expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(inv, (wide ** 2).mean(), rtol=1e-12, atol=0)
    # Default coefficients 25, 25, 1.
    torch.testing.assert_close(vicreg_loss(collapsed, wide), 25 * inv + 25 * var + cov, rtol=1e-12, atol=0)


def test_vicreg_on_gathered_views_is_their_sharded_computation():
    # Their DDP step: each rank adds its local MSE to the variance / covariance of the gathered batch, and DDP
    # averages the ranks' gradients. On equal shards that is the loss (and gradient) of the gathered batch.
    x, y = make_views(2, N=32, D=5, seed=4)
    full = vicreg_loss(x, y)
    shards = [slice(0, 16), slice(16, 32)]
    rank_losses = [25 * F.mse_loss(x[s], y[s]) + vicreg_loss(x, y, sim_weight=0.0) for s in shards]
    ddp = sum(rank_losses) / 2
    torch.testing.assert_close(ddp, full, rtol=1e-12, atol=0)
    for g, rg in zip(grads(full, (x, y)), grads(ddp, (x, y))):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------- Barlow Twins

def naive_barlow_twins(z1, z2, lambd=0.0051, eps=1e-5):
    """main.py's forward: BatchNorm1d(affine=False) in training mode, c / batch_size, loops over entries."""
    N, D = z1.shape

    def bn(z):
        cols = []
        for c in range(D):
            mu = z[:, c].sum() / N
            var = ((z[:, c] - mu) ** 2).sum() / N  # biased, as BatchNorm normalises
            cols.append((z[:, c] - mu) / torch.sqrt(var + eps))
        return torch.stack(cols, 1)

    a, b = bn(z1), bn(z2)
    loss = 0.0
    for i in range(D):
        for j in range(D):
            cij = (a[:, i] * b[:, j]).sum() / N
            loss = loss + ((1 - cij) ** 2 if i == j else lambd * cij ** 2)
    return loss


@pytest.mark.parametrize("lambd,eps", [(0.0051, 1e-5), (0.1, 0.0)])
def test_barlow_twins_matches_naive(lambd, eps):
    z1, z2 = make_views(2, N=20, D=6, seed=5)
    loss = barlow_twins_loss(z1, z2, lambd, eps)
    r1, r2 = detached([z1, z2])
    assert_matches(loss, naive_barlow_twins(r1, r2, lambd, eps), (z1, z2), (r1, r2))


def test_barlow_twins_invariances():
    z1, z2 = [v.detach() for v in make_views(2, N=32, D=6, seed=6)]
    base = barlow_twins_loss(z1, z2, eps=0.0)
    perm = torch.randperm(32, generator=gen(1))
    torch.testing.assert_close(barlow_twins_loss(z1[perm], z2[perm], eps=0.0), base, rtol=1e-12, atol=0)
    # Batch standardisation removes any per-channel positive scaling and shift, each view its own.
    g = gen(2)
    s1, s2 = torch.rand(6, generator=g, dtype=f64) + 0.2, torch.rand(6, generator=g, dtype=f64) * 5 + 0.2
    b1, b2 = torch.randn(6, generator=g, dtype=f64), torch.randn(6, generator=g, dtype=f64)
    torch.testing.assert_close(barlow_twins_loss(z1 * s1 + b1, z2 * s2 + b2, eps=0.0), base, rtol=1e-10, atol=0)
    cperm = torch.randperm(6, generator=g)  # the same channel permutation in both views
    torch.testing.assert_close(barlow_twins_loss(z1[:, cperm], z2[:, cperm], eps=0.0), base, rtol=1e-12, atol=0)
    torch.testing.assert_close(barlow_twins_loss(z2, z1, eps=0.0), base, rtol=1e-12, atol=0)


def test_barlow_twins_is_batchnorm1d_with_its_eps():
    # Their bn is nn.BatchNorm1d(D, affine=False) in training mode: eps 1e-5 and the biased variance.
    g = gen(7)
    z1 = torch.randn(16, 4, generator=g, dtype=f64) * torch.tensor([1.0, 0.01, 1e-3, 2.0], dtype=f64)
    z2 = torch.randn(16, 4, generator=g, dtype=f64)
    bn = torch.nn.BatchNorm1d(4, affine=False).double().train()
    c = bn(z1).T @ bn(z2) / 16
    expected = (c.diagonal() - 1).pow(2).sum() + 0.0051 * (c - torch.diag(c.diagonal())).pow(2).sum()
    torch.testing.assert_close(barlow_twins_loss(z1, z2), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(barlow_twins_cross_correlation(z1, z2), c, rtol=1e-12, atol=1e-15)
    # The eps matters for a channel of variance ~1e-6: eps = 0 gives a different loss.
    assert abs(barlow_twins_loss(z1, z2, eps=0.0).item() - expected.item()) > 1e-3
    # Perfectly correlated standardised views: c has unit diagonal only with eps = 0 and the divisor N.
    same = torch.randn(16, 3, generator=g, dtype=f64)
    c0 = barlow_twins_cross_correlation(same, same, eps=0.0)
    torch.testing.assert_close(c0.diagonal(), torch.ones(3, dtype=f64), rtol=1e-12, atol=0)


def test_barlow_twins_sharded_cross_correlation_sums_to_the_global_one():
    # Their DDP step: SyncBatchNorm standardises with the global statistics, each rank divides its local
    # bn(z1)^T bn(z2) by the global batch size, c is summed over ranks, then the objective.
    z1, z2 = make_views(2, N=24, D=5, seed=8)

    def sync_bn(z):  # global batch statistics, as SyncBatchNorm
        zc = z - z.mean(0)
        return zc / torch.sqrt(zc.pow(2).mean(0) + 1e-5)

    a, b = sync_bn(z1), sync_bn(z2)
    c = sum(barlow_twins_cross_correlation(a[s], b[s], batch_size=24, standardize=False)
            for s in (slice(0, 8), slice(8, 16), slice(16, 24)))
    sharded = barlow_twins_objective(c)
    full = barlow_twins_loss(z1, z2)
    torch.testing.assert_close(sharded, full, rtol=1e-12, atol=0)
    for g, rg in zip(grads(sharded, (z1, z2)), grads(full, (z1, z2))):  # with an autograd-aware sum
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------------------------------------- CW-RGP

def naive_cwrgp(views, w_size, G, w_iter, seed, normalize=True, eps=0.0, random_groups=True):
    """base/methods/cwrgp.py + Whitening2d(axis=0) ZCA as loops: repetitions, slices, views, groups."""
    g = gen(seed)
    d, (N, D) = len(views), views[0].shape
    k = D // G
    total, count = 0.0, 0
    for _ in range(w_iter):
        perm = torch.randperm(N, generator=g)
        z = [torch.zeros(N, D, dtype=f64) for _ in range(d)]
        for start in range(0, N, w_size):
            idx = perm[start:start + w_size]
            for i in range(d):
                shuffle = torch.randperm(D, generator=g) if random_groups else torch.arange(D)
                x = views[i][idx]
                xn = x - x.mean(1, keepdim=True)  # each image over all its channels
                out = torch.zeros(w_size, D, dtype=f64)
                for grp in range(G):
                    cols = shuffle[grp * k:(grp + 1) * k]
                    A = xn[:, cols]  # (w, k)
                    gram = A @ A.T / (k - 1)
                    gram = (1 - eps) * gram + eps * torch.eye(w_size, dtype=f64)
                    out = out.index_put((torch.arange(w_size)[:, None], cols[None, :]), naive_zca(gram) @ A)
                z[i] = z[i].index_put((idx,), out)
        for i in range(d):
            for j in range(i + 1, d):
                if normalize:
                    total = total + (2 - 2 * F.cosine_similarity(z[i], z[j], dim=1, eps=0.0).mean())
                else:
                    total = total + ((z[i] - z[j]) ** 2).mean()
                count += 1
    return total / count


@pytest.mark.parametrize(
    "d,w_size,G,w_iter,normalize,eps,random_groups",
    [(2, 8, 2, 1, True, 0.0, True), (3, 4, 1, 2, True, 0.0, True), (2, 8, 2, 2, False, 0.1, True),
     (2, 16, 3, 1, True, 0.0, False)],
)
def test_cwrgp_matches_naive(d, w_size, G, w_iter, normalize, eps, random_groups):
    views = make_views(d, N=16, D=24 if G != 3 else 54, seed=9 + d)
    loss = cwrgp_loss(views, w_size, num_groups=G, w_iter=w_iter, eps=eps, normalize=normalize,
                      random_groups=random_groups, generator=gen(11))
    ref_views = detached(views)
    ref = naive_cwrgp(ref_views, w_size, G, w_iter, 11, normalize, eps, random_groups)
    assert_matches(loss, ref, views, ref_views)


def test_cwrgp_invariances():
    x, y = [v.detach() for v in make_views(2, N=12, D=32, seed=12)]
    base = cwrgp_loss([x, y], 12, num_groups=2, generator=gen(0))
    # One slice: a reordering of the images (the same in both views) reorders the whitened rows.
    perm = torch.randperm(12, generator=gen(1))
    torch.testing.assert_close(cwrgp_loss([x[perm], y[perm]], 12, num_groups=2, generator=gen(0)), base,
                               rtol=1e-10, atol=0)
    # Each view's positive scale and each image's own constant offset over its channels are removed.
    offsets = torch.randn(12, 1, generator=gen(2), dtype=f64)
    torch.testing.assert_close(cwrgp_loss([3.0 * x + offsets, 0.2 * y - 2 * offsets], 12, num_groups=2,
                                          generator=gen(0)), base, rtol=1e-10, atol=0)
    # Without groups: any rotation of the channels that fixes the all-ones direction, the same in both views.
    one = cwrgp_loss([x, y], 12, num_groups=1, generator=gen(0))
    Q = rotation_fixing_ones(32, 3)
    torch.testing.assert_close(cwrgp_loss([x @ Q, y @ Q], 12, num_groups=1, generator=gen(0)), one,
                               rtol=1e-10, atol=0)


def test_cwrgp_code_semantics():
    x, y = [v.detach() for v in make_views(2, N=12, D=32, seed=13)]
    base = cwrgp_loss([x, y], 12, num_groups=2, generator=gen(0))
    # Centring is per image over its channels, not per channel over the batch: a shared per-channel offset
    # is not removed.
    shift = torch.randn(32, generator=gen(4), dtype=f64)
    assert abs(cwrgp_loss([x + shift, y + shift], 12, num_groups=2, generator=gen(0)).item() - base.item()) > 1e-3
    # The views do not share the partition: two identical views are whitened differently...
    assert cwrgp_loss([x, x], 12, num_groups=2, generator=gen(0)).item() > 0.1
    # ... unless the groups are fixed (--no_rg).
    assert cwrgp_loss([x, x], 12, num_groups=2, random_groups=False).item() < 1e-12
    # The Gram matrix is divided by k - 1 (their minus=1): whitened rows have G (k - 1) squared norm, so the
    # plain MSE between a view and its negation is 4 (D - G) / D.
    mse = cwrgp_loss([x, -x], 12, num_groups=2, normalize=False, random_groups=False)
    torch.testing.assert_close(mse, torch.tensor(4 * (32 - 2) / 32, dtype=f64), rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------------- INTL

def naive_intl(views, T=4, beta=None):
    """methods/intl.py + Whitening2dIterNorm(axis=0) + TL as loops over views and iterations."""
    N, D = views[0].shape
    beta = 0.01 * (math.log2(N) - 3) if beta is None else beta
    ts, tls = [], []
    for x in views:
        xn = x - x.mean(1, keepdim=True)
        sigma = xn @ xn.T / (D - 1)
        tr = sum(sigma[n, n] for n in range(N))
        sn = sigma / tr
        P = torch.eye(N, dtype=f64)
        for _ in range(T):
            P = 1.5 * P - 0.5 * torch.linalg.matrix_power(P, 3) @ sn
        t = (xn.T @ (P / torch.sqrt(tr))).T
        ts.append(t)
        tc = t - t.mean(1, keepdim=True)
        tls.append(sum((tc[n].pow(2).sum() / (D - 1) - 1) ** 2 for n in range(N)))
    loss = 0.0
    for i in range(1, len(views)):
        cos = sum(ts[i][n] @ ts[0][n] / (ts[i][n].norm() * ts[0][n].norm()) for n in range(N)) / N
        loss = loss + (2 - 2 * cos) + beta * (tls[i] + tls[0])
    return loss / (len(views) - 1)


@pytest.mark.parametrize("K,T,beta", [(2, 4, None), (3, 4, 0.1), (2, 7, 0.0)])
def test_intl_matches_naive(K, T, beta):
    views = make_views(K, N=16, D=12, seed=14 + K)
    loss = intl_loss(views, iterations=T, trade_off=beta)
    ref_views = detached(views)
    assert_matches(loss, naive_intl(ref_views, T, beta), views, ref_views)


def test_intl_invariances():
    x, y = [v.detach() for v in make_views(2, N=16, D=12, seed=15)]
    base = intl_loss([x, y])
    perm = torch.randperm(16, generator=gen(5))
    torch.testing.assert_close(intl_loss([x[perm], y[perm]]), base, rtol=1e-10, atol=0)
    offsets = torch.randn(16, 1, generator=gen(6), dtype=f64)
    torch.testing.assert_close(intl_loss([4.0 * x + offsets, 0.3 * y]), base, rtol=1e-10, atol=0)
    Q = rotation_fixing_ones(12, 7)
    torch.testing.assert_close(intl_loss([x @ Q, y @ Q]), base, rtol=1e-10, atol=0)


def test_intl_code_semantics():
    views = [v.detach() for v in make_views(3, N=16, D=48, seed=16)]  # N < D as theirs: a regular Gram matrix
    # The trade-off of their cal_trade_off, from the (gathered) batch size: 0.01 * (log2(16) - 3) = 0.01.
    assert default_trade_off(16) == pytest.approx(0.01) and default_trade_off(256) == pytest.approx(0.05)
    torch.testing.assert_close(intl_loss(views), intl_loss(views, trade_off=0.01), rtol=1e-14, atol=0)
    # View 0 is the anchor of every pair: which view comes first matters.
    assert abs(intl_loss(views).item() - intl_loss([views[1], views[0], views[2]]).item()) > 1e-4
    # Four iterations do not whiten (the trace loss is far from zero); ten nearly do.
    tl4 = intl_loss(views, iterations=4, trade_off=1.0) - intl_loss(views, iterations=4, trade_off=0.0)
    tl10 = intl_loss(views, iterations=10, trade_off=1.0) - intl_loss(views, iterations=10, trade_off=0.0)
    assert tl4.item() > 1.0 and abs(tl10.item()) < 1e-6


# ------------------------------------------------------------------------------------------ Shuffled-DBN

def naive_dbn(z1, z2, G, seed, shuffle=True):
    """ShuffledGroupWhitening + CovNorm's 'l22' loss as loops over views and groups."""
    g = gen(seed)
    N, D = z1.shape
    k = D // G
    out = []
    for z in (z1, z2):
        order = torch.randperm(D, generator=g) if shuffle and G > 1 else torch.arange(D)
        w = torch.zeros(N, D, dtype=f64)
        for grp in range(G):
            cols = order[grp * k:(grp + 1) * k]
            x = z[:, cols]
            xc = x - x.mean(0)
            cov = xc.T @ xc / N  # biased
            w = w.index_put((torch.arange(N)[:, None], cols[None, :]), xc @ naive_zca(cov))
        out.append(w)
    return sum(((out[0][n] - out[1][n]) ** 2).sum() for n in range(N)) / N


@pytest.mark.parametrize("G,shuffle", [(4, True), (1, True), (2, False)])
def test_dbn_matches_naive(G, shuffle):
    z1, z2 = make_views(2, N=24, D=16, seed=17)
    loss = dbn_loss(z1, z2, num_groups=G, shuffle=shuffle, generator=gen(18))
    r1, r2 = detached([z1, z2])
    assert_matches(loss, naive_dbn(r1, r2, G, 18, shuffle), (z1, z2), (r1, r2))


def test_dbn_invariances():
    z1, z2 = [v.detach() for v in make_views(2, N=24, D=16, seed=19)]
    base = dbn_loss(z1, z2, num_groups=4, generator=gen(0))
    # The batch statistics do not depend on the order of the images (any N: no slicing).
    perm = torch.randperm(24, generator=gen(8))
    torch.testing.assert_close(dbn_loss(z1[perm], z2[perm], num_groups=4, generator=gen(0)), base, rtol=1e-10, atol=0)
    # Batch centring removes per-channel offsets, whitening a positive scale of each view.
    b1, b2 = torch.randn(16, generator=gen(9), dtype=f64), torch.randn(16, generator=gen(10), dtype=f64)
    torch.testing.assert_close(dbn_loss(2.0 * z1 + b1, 0.5 * z2 + b2, num_groups=4, generator=gen(0)), base,
                               rtol=1e-10, atol=0)
    # One group: ZCA is rotation-equivariant, so a rotation of the channels (the same in both views) cancels.
    one = dbn_loss(z1, z2, num_groups=1)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(11), dtype=f64))
    torch.testing.assert_close(dbn_loss(z1 @ Q, z2 @ Q, num_groups=1), one, rtol=1e-10, atol=0)


def test_dbn_code_semantics():
    z1, z2 = [v.detach() for v in make_views(2, N=32, D=16, seed=20)]
    # Biased covariance and a loss summed over channels: each whitened row has mean squared norm D, so a view
    # and its negation (same groups) are 4 D apart.
    torch.testing.assert_close(dbn_loss(z1, -z1, num_groups=4, shuffle=False), torch.tensor(4.0 * 16, dtype=f64),
                               rtol=1e-10, atol=0)
    # Each view draws its own permutation: identical views are whitened in different groups.
    assert dbn_loss(z1, z1, num_groups=4, generator=gen(1)).item() > 1.0
    assert dbn_loss(z1, z1, num_groups=4, shuffle=False).item() < 1e-12
    # num_groups=None is their automatic rule ceil(2 D / N): 1 group here, 2 for N = 16.
    torch.testing.assert_close(dbn_loss(z1, z2, num_groups=None), dbn_loss(z1, z2, num_groups=1), rtol=0, atol=0)
    torch.testing.assert_close(dbn_loss(z1[:16], z2[:16], num_groups=None, generator=gen(2)),
                               dbn_loss(z1[:16], z2[:16], num_groups=2, generator=gen(2)), rtol=0, atol=0)


def test_zca_matrix_is_the_floored_inverse_square_root_with_a_finite_exact_gradient():
    g = gen(21)
    mix = torch.eye(6, dtype=f64) + 0.3 * torch.randn(6, 6, generator=g, dtype=f64)
    x = torch.randn(40, 6, generator=g, dtype=f64) @ mix
    cov = x.T @ x / 40
    evals, evecs = torch.linalg.eigh(cov)  # a healthy spectrum: no eigenvalue at the floor
    torch.testing.assert_close(zca_matrix(cov), (evecs * evals.rsqrt()) @ evecs.T, rtol=0, atol=1e-12)
    fn = lambda v: zca_matrix(v.T @ v / 40)
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))
    # Near-repeated eigenvalues (a covariance of ~identity): the divided differences still give the
    # derivative, checked against central differences of the forward.
    q, _ = torch.linalg.qr(torch.randn(16, 4, generator=g, dtype=f64))
    q = (4 * q).requires_grad_()
    R = torch.randn(4, 4, generator=g, dtype=f64)
    loss = lambda v: (zca_matrix(v.T @ v / 16) * R).sum()
    (grad,) = torch.autograd.grad(loss(q), q)
    h, num = 1e-6, torch.zeros(16, 4, dtype=f64)
    with torch.no_grad():
        for i in range(16):
            for j in range(4):
                e = torch.zeros(16, 4, dtype=f64)
                e[i, j] = h
                num[i, j] = (loss(q + e) - loss(q - e)) / (2 * h)
    torch.testing.assert_close(grad, num, rtol=0, atol=1e-6)
    # A zero covariance (a collapsed batch): finite.
    z = torch.zeros(8, 3, dtype=f64, requires_grad=True)
    (gz,) = torch.autograd.grad((zca_matrix(z.T @ z / 8) * R[:3, :3]).sum(), z)
    assert torch.isfinite(gz).all()


# --------------------------------------------------------------------------------------- all five losses

def _call(name, views, generator=None):
    """Each loss at a small, valid configuration: views (N=32, D=32)."""
    if name == "vicreg":
        return vicreg_loss(views[0], views[1])
    if name == "barlow_twins":
        return barlow_twins_loss(views[0], views[1])
    if name == "cwrgp":
        return cwrgp_loss(views, 8, num_groups=2, generator=generator)
    if name == "intl":
        return intl_loss(views)
    return dbn_loss(views[0], views[1], num_groups=4, generator=generator)


LOSSES = ["vicreg", "barlow_twins", "cwrgp", "intl", "dbn"]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", ["duplicated", "collapsed", "constant"])
def test_degenerate_batches_give_finite_loss_and_gradients(name, case):
    g = gen(22)
    if case == "duplicated":  # every image twice: singular covariances / Gram matrices
        base = torch.randn(16, 32, generator=g).repeat(2, 1)
        views = [base + 0.1 * torch.randn(16, 32, generator=g).repeat(2, 1) for _ in range(2)]
    elif case == "collapsed":  # every image the same embedding
        views = [torch.randn(1, 32, generator=g).expand(32, 32).clone() for _ in range(2)]
    else:  # every entry the same: zero covariance across the batch and across the channels
        views = [torch.full((32, 32), 0.7) for _ in range(2)]
    views = [v.requires_grad_() for v in views]
    loss = _call(name, views, gen(0))
    assert torch.isfinite(loss), loss
    assert all(torch.isfinite(gv).all() for gv in grads(loss, views))


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_autocast_gives_a_float32_loss(name):
    views = [v.detach().float() for v in make_views(2, N=32, D=32, seed=23, dtype=torch.float32)]
    ref = _call(name, views, gen(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin = torch.nn.Linear(32, 32)
        lin.weight.data = torch.eye(32)
        lin.bias.data.zero_()
        low = [lin(v) for v in views]  # bf16 embeddings, as a head under autocast gives
        assert low[0].dtype == torch.bfloat16
        loss = _call(name, low, gen(3))
    assert loss.dtype == torch.float32
    # The only difference from the float32 computation is the bf16 rounding of the embeddings themselves.
    exact = _call(name, [v.to(torch.bfloat16).float() for v in views], gen(3))
    torch.testing.assert_close(loss, exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref, rtol=5e-2, atol=1e-3)


def test_float64_stays_float64_and_public_names():
    views = make_views(2, N=32, D=32, seed=24)
    for name in LOSSES:
        assert _call(name, views, gen(0)).dtype == f64
    for fn in (vicreg_loss, barlow_twins_loss, cwrgp_loss, intl_loss, dbn_loss):
        assert getattr(wmse.losses, fn.__name__) is fn and fn.__name__ in wmse.losses.__all__


def _v(N=32, D=32, d=2):
    return [torch.randn(N, D) for _ in range(d)]


@pytest.mark.parametrize(
    "fn,args,kwargs,match",
    [
        (vicreg_loss, (torch.randn(8, 4), torch.randn(8, 5)), {}, "same shape"),
        (vicreg_loss, (torch.randn(8), torch.randn(8)), {}, r"\(N, D\)"),
        (vicreg_loss, (torch.randn(1, 4), torch.randn(1, 4)), {}, "at least 2 images"),
        (vicreg_loss, (torch.randn(8, 4), torch.randn(8, 4)), {"eps": 0.0}, "eps must be > 0"),
        (vicreg_loss, (torch.randn(8, 4), torch.randn(8, 4)), {"var_weight": -1.0}, "var_weight"),
        (barlow_twins_loss, (torch.randn(8, 4), torch.randn(7, 4)), {}, "same shape"),
        (barlow_twins_loss, (torch.randn(1, 4), torch.randn(1, 4)), {}, "at least 2 images"),
        (barlow_twins_loss, (torch.randn(8, 4), torch.randn(8, 4)), {"lambd": -0.1}, "lambd"),
        (barlow_twins_loss, (torch.randn(8, 4), torch.randn(8, 4)), {"eps": -1.0}, "eps"),
        (barlow_twins_cross_correlation, (torch.randn(8, 4), torch.randn(8, 4)), {"batch_size": 0}, "batch_size"),
        (barlow_twins_objective, (torch.randn(4, 3),), {}, "square"),
        (cwrgp_loss, (_v(d=1), 8), {}, "at least 2 views"),
        (cwrgp_loss, (_v(), 64), {}, "larger than the number of images"),
        (cwrgp_loss, (_v(), 12), {}, "multiple of w_size"),
        (cwrgp_loss, (_v(), 8), {"num_groups": 3}, "multiple of num_groups"),
        (cwrgp_loss, (_v(), 16), {"num_groups": 2}, "must exceed w_size"),
        (cwrgp_loss, (_v(), 8), {"num_groups": 0}, "num_groups must be a positive"),
        (cwrgp_loss, (_v(), 8), {"num_groups": 2, "w_iter": 0}, "w_iter"),
        (cwrgp_loss, (_v(), 8), {"num_groups": 2, "eps": 1.0}, "eps"),
        (intl_loss, (_v(d=1),), {}, "at least 2 views"),
        (intl_loss, (_v(),), {"iterations": 0}, "iterations"),
        (intl_loss, (_v(N=4),), {}, "pass trade_off explicitly"),
        (intl_loss, (_v(),), {"trade_off": -1.0}, "trade_off"),
        (dbn_loss, (torch.randn(8, 4), torch.randn(8, 6)), {}, "same shape"),
        (dbn_loss, (torch.randn(32, 32), torch.randn(32, 32)), {"num_groups": 5}, "multiple of the number of groups"),
        (dbn_loss, (torch.randn(32, 32), torch.randn(32, 32)), {"num_groups": 0}, "positive integer"),
        (dbn_loss, (torch.randn(16, 32), torch.randn(16, 32)), {"num_groups": 1}, "smaller than the batch size"),
    ],
)
def test_bad_arguments(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)
