"""The optimizer registry: AdamW's weight-decay groups against torch.optim.AdamW on hand-written groups."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wmse.config import Config
from wmse.optim import OPTIMIZERS, build_optimizer


class TinyViTLike(nn.Module):
    """The parameter kinds of a ViT: tokens, position embedding, patch conv, linear, LayerNorm, BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 4))
        self.patch = nn.Conv2d(1, 4, 2, 2)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, 4)
        t = torch.cat([self.cls_token.expand(len(x), -1, -1), t], 1) + self.pos_embed
        return self.bn(self.fc(self.norm(t).mean(1)))


# By hand: which parameters decay (the ViT convention: not norms, biases, tokens, position embeddings).
DECAYED = {"patch.weight", "fc.weight"}


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(6, 1, 4, 4, generator=g)).square().mean().backward()
        opt.step()


def test_adamw_matches_torch_adamw_on_hand_written_groups():
    torch.manual_seed(0)
    ours = TinyViTLike()
    ref = copy.deepcopy(ours)
    cfg = Config(optimizer="adamw", lr=0.05, weight_decay=0.3)
    opt = build_optimizer(ours.named_parameters(), cfg)
    named = dict(ref.named_parameters())
    want = torch.optim.AdamW([
        {"params": [named[n] for n in sorted(DECAYED)], "weight_decay": 0.3},
        {"params": [p for n, p in named.items() if n not in DECAYED], "weight_decay": 0.0},
    ], lr=0.05)
    _train(ours, opt)
    _train(ref, want)
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    names = {id(p): n for n, p in ours.named_parameters()}
    decay = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert len(decay) == 1 and {names[id(p)] for p in decay[0]["params"]} == DECAYED
    assert isinstance(opt, torch.optim.AdamW)


def test_adamw_decay_is_decoupled_and_spares_the_excluded_parameters():
    # With zero gradients Adam's update is 0: only the decay moves a parameter, by lr * wd * p per step.
    torch.manual_seed(0)
    model = TinyViTLike()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model.named_parameters(), Config(optimizer="adamw", lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if n in DECAYED else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)


def test_bare_parameters_still_build_every_optimizer():
    model = TinyViTLike()
    for name in OPTIMIZERS.names():
        opt = build_optimizer(model.parameters(), Config(optimizer=name))
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'.*adamw"):
        build_optimizer(TinyViTLike().parameters(), Config(optimizer="lamb"))


def test_fused_adamw_skips_a_step_on_the_device():
    """The loop's sync_every > 1 sets ``found_inf``: fused AdamW must leave weights and step count alone."""
    model = TinyViTLike()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model.named_parameters(), Config(optimizer="adamw", weight_decay=0.1), fused=True)
    model(torch.randn(6, 1, 4, 4)).square().mean().backward()
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
