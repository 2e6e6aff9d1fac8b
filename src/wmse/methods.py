"""Self-supervised methods: W-MSE, Contrastive (SimCLR NT-Xent) and BYOL.

Each method owns an encoder (``backbone``) and a projection head (``head``) and turns a list
of augmented views into a scalar loss. The training loop calls, per step::

    loss = method.loss(views)          # views: d tensors (N, C, S, S), one per view
    loss.backward(); optimizer.step()  # optimizer over method.trainable_parameters()
    method.on_step(step, total_steps)  # BYOL: EMA update of its target network

and evaluation calls ``method.features(images)`` (backbone output, no head) on frozen weights.

All views go through the networks as one concatenated batch of K = N*d images. The official
code runs the encoder once per view, so its BatchNorm statistics are per view; here they are
over all K images: one pass is faster, and as every view comes from the same augmentation
distribution the batch statistics estimate the same moments, from d times more samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .losses import byol_loss, nt_xent_loss, wmse_loss
from .models import ProjectionHead, build_backbone

if TYPE_CHECKING:  # config imports nothing from here; keep the import one-way at runtime too
    from .config import Config

__all__ = ["Method", "WMSE", "Contrastive", "BYOL", "build_method", "byol_tau"]


def _pairs(d: int) -> list[tuple[int, int]]:
    """All index pairs i < j of d views (1 pair for d=2, 6 for d=4)."""
    return [(i, j) for i in range(d) for j in range(i + 1, d)]


def _check_views(views: Sequence[Tensor], n_views: int | None = None) -> None:
    if isinstance(views, Tensor) or not isinstance(views, Sequence):
        raise ValueError("views must be a list of d image tensors (N, C, S, S), one per view")
    if len(views) < 2:
        raise ValueError(f"views: need at least 2 views of each image, got {len(views)}")
    if n_views is not None and len(views) != n_views:
        raise ValueError(f"views: this method was built for n_views={n_views}, got {len(views)} views")
    for i, v in enumerate(views):
        if not isinstance(v, Tensor) or v.dim() != 4:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"views[{i}] must be a (N, C, S, S) image tensor, got {shape}")
        if v.shape != views[0].shape:
            raise ValueError(
                f"views: all views must have the same shape, got {tuple(views[0].shape)} and {tuple(v.shape)}"
            )


class Method(nn.Module):
    """Base class: an encoder + head trained by a self-supervised loss.

    Attributes:
        backbone: encoder E, (B, C, S, S) -> (B, backbone.out_dim).
        head: projection head g, (B, backbone.out_dim) -> (B, emb).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed(self, views: Sequence[Tensor]) -> list[Tensor]:
        """Head outputs of every view: d tensors (N, C, S, S) -> d tensors (N, emb).

        One forward pass over the K = N*d concatenated images, then split back per view.
        """
        return list(self.head(self.backbone(torch.cat(list(views)))).chunk(len(views)))

    def loss(self, views: Sequence[Tensor]) -> Tensor:
        """Scalar loss of d augmented views, each (N, C, S, S) float, of the same N images."""
        raise NotImplementedError

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        """Same as :meth:`loss` (so DDP wrappers see the computation in ``forward``)."""
        return self.loss(views)

    def features(self, images: Tensor, head: bool = False) -> Tensor:
        """Representation for evaluation: (B, C, S, S) -> (B, out_dim), or (B, emb) with ``head=True``.

        Uses the module's current mode; call ``.eval()`` and ``torch.no_grad()`` for frozen features.
        """
        h = self.backbone(images)
        return self.head(h) if head else h

    def on_step(self, step: int, total_steps: int) -> None:
        """Hook called by the training loop after each optimizer step.

        ``step``: optimizer steps done so far; ``total_steps``: steps of the whole run.
        """

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer should update (excludes frozen ones such as BYOL's target)."""
        return (p for p in self.parameters() if p.requires_grad)


class WMSE(Method):
    """W-MSE: whiten each view's embeddings in slices of ``w_size`` images, then MSE between views.

    ``n_views`` is d (2 or 4); the batch size N must be a multiple of ``w_size`` and ``w_size`` must
    exceed the embedding size (``w_size >= 2 * emb`` recommended).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        n_views: int = 2,
        w_size: int = 128,
        w_iter: int = 1,
        eps: float = 0.0,
        normalize: bool = True,
        whitening: str = "cholesky",
    ) -> None:
        super().__init__(backbone, head)
        if n_views < 2:
            raise ValueError(f"n_views must be >= 2 (W-MSE compares views of one image), got {n_views}")
        if w_iter < 1:
            raise ValueError(f"w_iter must be >= 1, got {w_iter}")
        self.n_views, self.w_size, self.w_iter = n_views, w_size, w_iter
        self.eps, self.normalize, self.whitening = eps, normalize, whitening

    def loss_from_embeddings(
        self, emb: Sequence[Tensor] | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """W-MSE loss of d embeddings (N, emb) of the same N images, or one (d, N, emb) tensor.

        Separate from :meth:`loss` so a distributed variant can gather embeddings first.
        ``generator`` draws the slice permutations (None: the global RNG).
        """
        views = emb if isinstance(emb, Tensor) else list(emb)
        return wmse_loss(views, self.w_size, self.w_iter, self.eps, self.normalize, self.whitening, generator)

    def loss(self, views: Sequence[Tensor]) -> Tensor:
        _check_views(views, self.n_views)
        return self.loss_from_embeddings(self.embed(views))


class Contrastive(Method):
    """SimCLR NT-Xent over every pair of views, averaged over pairs.

    As in the official baseline the head ends with ``BatchNorm1d(emb)`` (``ProjectionHead(bn_last=True)``).
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module, temperature: float = 0.5, normalize: bool = True
    ) -> None:
        super().__init__(backbone, head)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.normalize = temperature, normalize

    def loss(self, views: Sequence[Tensor]) -> Tensor:
        _check_views(views)
        z = self.embed(views)
        pairs = _pairs(len(z))
        total = sum(nt_xent_loss(z[i], z[j], self.temperature, self.normalize) for i, j in pairs)
        return total / len(pairs)


def byol_tau(step: int, total_steps: int, tau0: float) -> float:
    """EMA rate of BYOL's target: rises from ``tau0`` at step 0 to 1 at ``total_steps`` (cosine)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - tau0) * (math.cos(math.pi * progress) + 1.0) / 2.0


class BYOL(Method):
    """BYOL: online backbone + head + predictor regress an EMA target's projection of another view.

    The target (``target_backbone``, ``target_head``) starts as a copy of the online networks, never
    receives gradients and follows them by EMA in :meth:`on_step`. Loss for every pair i < j:
    ``byol_loss(p_i, z'_j) + byol_loss(p_j, z'_i)``, averaged over pairs (the official symmetric sum).
    The loss is always the normalised MSE (the official ``--no_norm`` variant of BYOL is not offered).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module, tau: float = 0.99) -> None:
        super().__init__(backbone, head)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau (BYOL's initial EMA rate) must be in [0, 1], got {tau}")
        self.predictor = predictor
        self.tau0 = tau
        self.tau = tau
        self.target_backbone = copy.deepcopy(backbone)
        self.target_head = copy.deepcopy(head)
        for p in self._target_parameters():
            p.requires_grad_(False)

    def _target_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.target_backbone.parameters()
        yield from self.target_head.parameters()

    def loss(self, views: Sequence[Tensor]) -> Tensor:
        _check_views(views)
        d = len(views)
        p = list(self.predictor(torch.cat(self.embed(views))).chunk(d))
        with torch.no_grad():
            z = list(self.target_head(self.target_backbone(torch.cat(list(views)))).chunk(d))
        pairs = _pairs(d)
        total = sum(byol_loss(p[i], z[j]) + byol_loss(p[j], z[i]) for i, j in pairs)
        return total / len(pairs)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, for parameters (buffers follow their own BN)."""
        online = list(self.backbone.parameters()) + list(self.head.parameters())
        for t, s in zip(self._target_parameters(), online, strict=True):
            t.lerp_(s, 1.0 - tau)  # t + (1 - tau) * (s - t)

    def on_step(self, step: int, total_steps: int) -> None:
        """EMA update with tau = 1 - (1 - tau0) * (cos(pi * step / total_steps) + 1) / 2."""
        self.tau = byol_tau(step, total_steps, self.tau0)
        self.update_target(self.tau)


def build_method(cfg: Config, in_channels: int) -> Method:
    """The method of ``cfg`` (``cfg.method`` in "wmse", "contrastive", "byol") with fresh weights.

    ``in_channels`` comes from the data (1 for Fashion-MNIST, 3 for RGB).
    """
    backbone = build_backbone(cfg.arch, cfg.image_size, in_channels)
    bn_last = cfg.method == "contrastive"
    head = ProjectionHead(backbone.out_dim, cfg.head_hidden, cfg.emb, bn_last=bn_last)
    if cfg.method == "wmse":
        return WMSE(backbone, head, cfg.n_views, cfg.w_size, cfg.w_iter, cfg.w_eps, cfg.normalize, cfg.whitening)
    if cfg.method == "contrastive":
        return Contrastive(backbone, head, cfg.temperature, cfg.normalize)
    if cfg.method == "byol":
        predictor = ProjectionHead(cfg.emb, cfg.predictor_hidden, cfg.emb)
        return BYOL(backbone, head, predictor, cfg.tau)
    raise ValueError(f"unknown method {cfg.method!r}; choose one of 'wmse', 'contrastive', 'byol'")
