"""W-MSE, Contrastive and BYOL: wiring against independent references, a few training steps, EMA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wmse.config import Config
from wmse.losses import wmse_loss
from wmse.methods import BYOL, WMSE, Contrastive, Method, build_method, byol_tau
from wmse.models import ProjectionHead, SmallConvNet

N, C, S, EMB = 32, 1, 16, 8  # images per batch, channels, side, embedding size
W_SIZE = 16  # > EMB, divides N




def _views(d: int, seed: int = 0) -> list[Tensor]:
    """d noisy copies of N random images: stand-ins for augmented views."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, C, S, S, generator=g)
    return [base + 0.3 * torch.randn(N, C, S, S, generator=g) for _ in range(d)]


def _parts(seed: int = 0, bn_last: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    backbone = SmallConvNet(C, out_dim=32)
    return backbone, ProjectionHead(backbone.out_dim, 64, EMB, bn_last=bn_last)


def _make(kind: str, d: int = 2) -> Method:
    backbone, head = _parts(bn_last=kind == "contrastive")
    if kind == "wmse":
        return WMSE(backbone, head, n_views=d, w_size=W_SIZE)
    if kind == "contrastive":
        return Contrastive(backbone, head, contrastive_temperature=0.5)
    return BYOL(backbone, head, ProjectionHead(EMB, 64, EMB), byol_tau=0.99)


def _per_view(method: Method, views: list[Tensor]) -> list[Tensor]:
    """Head outputs computed view by view (eval mode: BN uses running stats, so batching is irrelevant)."""
    return [method.head(method.backbone(v)) for v in views]


# ---------------------------------------------------------------------------------------------
# Loss wiring against independent references (eval mode, so concatenation cannot change BN)


@pytest.mark.parametrize("d", [2, 4])
def test_wmse_loss_matches_loss_of_per_view_embeddings(d: int) -> None:
    method = _make("wmse", d).eval()
    views = _views(d)
    with torch.no_grad():
        torch.manual_seed(1)  # same random slicing in both calls
        got = method.loss(views)
        torch.manual_seed(1)
        want = wmse_loss(_per_view(method, views), W_SIZE)
        assert torch.allclose(got, want, atol=1e-5)
        torch.manual_seed(1)
        assert torch.allclose(method.loss_from_embeddings(_per_view(method, views)), want, atol=1e-5)
        torch.manual_seed(1)  # one (d, N, D) tensor, as a distributed wrapper passes it
        assert torch.allclose(method.loss_from_embeddings(torch.stack(_per_view(method, views))), want, atol=1e-5)


def _naive_nt_xent(a: Tensor, b: Tensor, t: float) -> Tensor:
    """NT-Xent by definition, float64, one anchor at a time over the 2N samples."""
    z = F.normalize(torch.cat([a, b]).double(), dim=1)
    n = a.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for k in range(2 * n):
        pos = (k + n) % (2 * n)
        sims = torch.stack([z[k] @ z[m] / t for m in range(2 * n) if m != k])
        pos_sim = z[k] @ z[pos] / t
        total += -(pos_sim - torch.logsumexp(sims, 0))
    return total / (2 * n)


def test_contrastive_loss_matches_naive_nt_xent_over_pairs() -> None:
    method = _make("contrastive").eval()
    views = _views(3)  # 3 views -> 3 pairs, averaged
    with torch.no_grad():
        z = _per_view(method, views)
        want = sum(_naive_nt_xent(z[i], z[j], 0.5) for i, j in [(0, 1), (0, 2), (1, 2)]) / 3
        got = method.loss(views)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_byol_loss_matches_naive_symmetric_loss() -> None:
    method = _make("byol").eval()
    views = _views(2)
    with torch.no_grad():
        p = [method.predictor(z) for z in _per_view(method, views)]
        zt = [method.target_head(method.target_backbone(v)) for v in views]

        def cos_loss(x: Tensor, y: Tensor) -> Tensor:
            return (2 - 2 * F.cosine_similarity(x.double(), y.double(), dim=1)).mean()

        want = cos_loss(p[0], zt[1]) + cos_loss(p[1], zt[0])
        got = method.loss(views)
    assert torch.allclose(got.double(), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A few optimisation steps of each method


def _params(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("kind, d", [("wmse", 2), ("wmse", 4), ("contrastive", 2), ("byol", 2)])
def test_few_steps_train_backbone_and_head(kind: str, d: int) -> None:
    method = _make(kind, d).train()
    opt = torch.optim.Adam(method.trainable_parameters(), lr=1e-3)
    before_bb, before_head = _params(method.backbone), _params(method.head)
    for step in range(1, 4):
        loss = method.loss(_views(d, seed=step))
        assert loss.dim() == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_step(step, 3)
    for before, module in ((before_bb, method.backbone), (before_head, method.head)):
        changed = [not torch.equal(b, a) for b, a in zip(before, module.parameters())]
        assert all(changed), f"{kind}: some {type(module).__name__} parameters did not change"


def test_wmse_training_lowers_the_loss_on_fixed_views() -> None:
    method = _make("wmse").train()
    opt = torch.optim.Adam(method.trainable_parameters(), lr=3e-3)
    views = _views(2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        loss = method.loss_from_embeddings(method.embed(views), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_byol_target_is_frozen_and_follows_ema() -> None:
    method = _make("byol").train()
    trainable = {id(p) for p in method.trainable_parameters()}
    target = list(method.target_backbone.parameters()) + list(method.target_head.parameters())
    assert not any(p.requires_grad for p in target)
    assert not trainable & {id(p) for p in target}
    assert {id(p) for p in method.predictor.parameters()} <= trainable
    online = list(method.backbone.parameters()) + list(method.head.parameters())
    assert all(torch.equal(t, o) for t, o in zip(target, online))  # target starts as a copy

    opt = torch.optim.Adam(method.trainable_parameters(), lr=1e-2)
    loss = method.loss(_views(2))
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in target)
    old_target = [p.detach().clone() for p in target]
    opt.step()
    new_online = [p.detach().clone() for p in online]
    method.on_step(10, 40)
    tau = 1 - (1 - 0.99) * (math.cos(math.pi * 10 / 40) + 1) / 2
    assert method.tau == pytest.approx(tau)
    for t, old, o in zip(target, old_target, new_online):
        torch.testing.assert_close(t.detach(), tau * old + (1 - tau) * o, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(t, old) for t, old in zip(target, old_target))


def test_byol_tau_schedule() -> None:
    tau0, total = 0.99, 1000
    # Independent form: tau0 + (1 - tau0) * (1 - cos(pi p)) / 2, p = step / total.
    for step in (0, 250, 500, 999, 1000):
        want = tau0 + (1 - tau0) * (1 - math.cos(math.pi * step / total)) / 2
        assert byol_tau(step, total, tau0) == pytest.approx(want, abs=1e-12)
    assert byol_tau(0, total, tau0) == pytest.approx(0.99)
    assert byol_tau(500, total, tau0) == pytest.approx(0.995)
    assert byol_tau(total, total, tau0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        byol_tau(0, 0, tau0)


def test_wmse_and_contrastive_on_step_change_nothing() -> None:
    for kind in ("wmse", "contrastive"):
        method = _make(kind)
        before = {k: v.clone() for k, v in method.state_dict().items()}
        method.on_step(5, 10)
        assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())


# ---------------------------------------------------------------------------------------------
# features, build_method, input checks


def test_features_shapes() -> None:
    method = _make("wmse").eval()
    x = torch.randn(5, C, S, S)
    with torch.no_grad():
        assert method.features(x).shape == (5, 32)
        assert method.features(x, head=True).shape == (5, EMB)
        assert torch.equal(method.features(x), method.backbone(x))


@pytest.mark.parametrize("method_name, cls", [("wmse", WMSE), ("contrastive", Contrastive), ("byol", BYOL)])
def test_build_method_from_config(method_name: str, cls: type) -> None:
    cfg = Config(method=method_name, arch="small", image_size=28, emb=16, head_hidden=48,
                 byol_predictor_hidden=40, n_views=4, w_size=32, w_iter=2, batch_size=64, contrastive_temperature=0.2,
                 byol_tau=0.98)
    method = build_method(cfg, in_channels=1)
    assert isinstance(method, cls)
    assert method.backbone.features[0].in_channels == 1
    assert method.head[0].in_features == method.backbone.out_dim
    assert method.head[0].out_features == 48 and method.head[3].out_features == 16
    assert isinstance(method.head[-1], nn.BatchNorm1d) is (method_name == "contrastive")
    if method_name == "wmse":
        assert (method.n_views, method.w_size, method.w_iter) == (4, 32, 2)
    if method_name == "contrastive":
        assert method.contrastive_temperature == 0.2
    if method_name == "byol":
        assert method.byol_tau == 0.98 and method.predictor[0].out_features == 40
        assert method.predictor[3].out_features == 16
    x = [torch.randn(64, 1, 28, 28) for _ in range(4)]
    assert torch.isfinite(method.loss(x if method_name == "wmse" else x[:2]))


def test_build_method_resnet_rgb() -> None:
    method = build_method(Config(arch="resnet18", image_size=32, emb=64), in_channels=3)
    assert method.backbone.conv1.kernel_size == (3, 3) and method.head[0].in_features == 512


def test_views_are_checked() -> None:
    method = _make("wmse", 2)
    with pytest.raises(ValueError, match="n_views=2"):
        method.loss(_views(4))
    with pytest.raises(ValueError, match="list of d image tensors"):
        method.loss(torch.stack(_views(2)))
    with pytest.raises(ValueError, match="same shape"):
        method.loss([torch.randn(N, C, S, S), torch.randn(N, C, S + 2, S + 2)])
    with pytest.raises(ValueError, match="at least 2 views"):
        _make("byol").loss(_views(1))
    with pytest.raises(ValueError, match="n_views must be >= 2"):
        WMSE(*_parts(), n_views=1)
