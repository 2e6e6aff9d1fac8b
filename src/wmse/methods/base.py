"""The Method base class and the METHODS registry.

A method owns an encoder (``backbone``) and a projection head (``head``) and turns a list of augmented
views into a scalar loss. The training loop calls, per step, in one process or under DDP alike::

    loss = method.loss(views, ctx)     # views: d tensors (N, C, S, S), one per view; ctx: the step's ProcessContext
    loss.backward(); optimizer.step()  # optimizer over method.trainable_parameters()
    method.on_step(step, total_steps)  # BYOL: EMA update of its target network

and evaluation calls ``method.features(images)`` (backbone output, no head) on frozen weights.

A method is one class in one module, registered by name (``@METHODS.register("name")``). It declares
its own config fields once, in a nested ``Options`` dataclass, each name carrying the method's prefix (they
become ``--field`` on the command line, ``cfg.field`` in the config, keyword arguments of the constructor
with the same defaults, and attributes ``self.field``); it checks them in :meth:`Method.validate_config`, is
built from a config by the generic :meth:`Method.from_config`, and owns its multi-process behaviour: what its
:meth:`Method.loss` gathers with ``ctx.gather`` (the identity in one process), :meth:`Method.check_processes`
(how a batch may be split) and ``sync_bn_modules`` (which submodules SyncBatchNorm converts).

All views go through the networks as one concatenated batch of K = N*d images. The official code runs
the encoder once per view, so its BatchNorm statistics are per view; here they are over all K images:
one pass is faster, and as every view comes from the same augmentation distribution the batch statistics
estimate the same moments, from d times more samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..models import ProjectionHead
from ..registry import Registry
from ..seeding import step_generator

if TYPE_CHECKING:  # methods never import the config at runtime: the config reads them
    from ..config import Config

__all__ = ["Method", "EmbeddingMethod", "METHODS", "ProcessContext", "ONE_PROCESS", "step_generator", "view_pairs", "check_views", "mean_over_pairs"]


def view_pairs(d: int) -> list[tuple[int, int]]:
    """All index pairs i < j of d views (1 pair for d=2, 6 for d=4)."""
    return [(i, j) for i in range(d) for j in range(i + 1, d)]


def mean_over_pairs(loss: Callable[[Tensor, Tensor], Tensor], z: Sequence[Tensor]) -> Tensor:
    """The mean of ``loss(z_i, z_j)`` over every pair i < j of the views ``z`` (a two-view loss for d views)."""
    pairs = view_pairs(len(z))
    return sum(loss(z[i], z[j]) for i, j in pairs) / len(pairs)


def check_views(views: Sequence[Tensor], n_views: int | None = None) -> None:
    """ValueError unless ``views`` is a list of >= 2 (``n_views`` when given) same-shape (N, C, S, S) tensors."""
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


def _no_gather(x: Tensor, dim: int) -> Tensor:
    return x


@dataclass(frozen=True)
class ProcessContext:
    """Where and when a loss is computed: the second argument of :meth:`Method.loss`.

    ``gather(x, dim)``: differentiable all-gather, every rank's ``x`` concatenated along ``dim`` in rank
    order (the identity in one process); its backward sums the gradients of all ranks, so a loss whose mean
    over ranks is the global loss gets the single-process gradient on the whole batch (see wmse.distributed).
    ``step``: the training step, which seeds the method's random draws (:meth:`generator`); None (a call
    outside the training loop, :data:`ONE_PROCESS`) draws from the global RNG.
    """

    rank: int = 0
    world_size: int = 1
    step: int | None = None
    seed: int = 0
    gather: Callable[[Tensor, int], Tensor] = _no_gather

    def generator(self, shared: bool, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The step's generator on ``device``: the same on every rank (``shared``) or this rank's own; None
        outside the training loop (the global RNG)."""
        if self.step is None:
            return None
        return step_generator(self.seed, self.step, 0 if shared else self.rank, device)


ONE_PROCESS = ProcessContext()
"""One process, no training step: what :meth:`Method.loss` assumes when called without a context."""


class Method(nn.Module):
    """Base class: an encoder + head trained by a self-supervised loss.

    Attributes:
        backbone: encoder E, (B, C, S, S) -> (B, backbone.out_dim).
        head: projection head g, (B, backbone.out_dim) -> (B, emb).
    """

    @dataclass(frozen=True)
    class Options:
        """The method's own config fields (none here); subclasses declare theirs the same way."""

    title: ClassVar[str] = ""  # how `wmse presets` and the README name the method
    citation: ClassVar[str] = ""  # the paper that defines it

    # Run fields (not the method's own) its constructor takes, by the same name: from_config passes them.
    run_fields: ClassVar[tuple[str, ...]] = ()
    # Former names of its fields, {old: new}: config.json files and checkpoints that use them still load.
    renamed_fields: ClassVar[dict[str, str]] = {}
    # The default head ends with BatchNorm1d(emb) (the official Contrastive baseline's head).
    head_bn_last: ClassVar[bool] = False
    # Submodules whose BatchNorm layers become SyncBatchNorm with --sync_bn (the backbone's stay per rank).
    sync_bn_modules: ClassVar[tuple[str, ...]] = ("head",)

    def __init__(self, backbone: nn.Module, head: nn.Module, **options: Any) -> None:
        """``options``: fields of :class:`Options` by name; the others take its defaults. Each becomes an
        attribute (``self.w_size``). An unknown name raises TypeError listing the method's fields."""
        super().__init__()
        self.backbone = backbone
        self.head = head
        names = [f.name for f in dataclasses.fields(self.Options)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            hints = [f"{n!r} (now {self.renamed_fields[n]!r})" if n in self.renamed_fields else repr(n)
                     for n in unknown]
            raise TypeError(f"{type(self).__name__} has no option{'s' * (len(hints) > 1)} {', '.join(hints)}; "
                            f"its options: {', '.join(names) or 'none'}")
        chosen = self.Options(**options)
        for name in names:
            setattr(self, name, getattr(chosen, name))

    def options(self) -> Any:
        """The method's field values, as its :class:`Options`."""
        return self.Options(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self.Options)})

    # ------------------------------------------------------------------ construction from a config

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> Method:
        """The method with fresh weights around ``backbone`` (head: :meth:`default_head`), its fields and
        ``run_fields`` taken from ``cfg``."""
        return cls(backbone, cls.default_head(cfg, backbone), **cls.config_arguments(cfg))

    @classmethod
    def config_arguments(cls, cfg: Config) -> dict[str, Any]:
        """The constructor's keyword arguments from ``cfg``: every field of ``Options`` and of ``run_fields``."""
        names = [f.name for f in dataclasses.fields(cls.Options)] + list(cls.run_fields)
        return {name: getattr(cfg, name) for name in names}

    @classmethod
    def default_head(cls, cfg: Config, backbone: nn.Module, bn_last: bool | None = None) -> nn.Module:
        """Linear-BN-ReLU-Linear (``cfg.head_layers`` Linear layers), BatchNorm1d last when ``bn_last``
        (default: the class's ``head_bn_last``)."""
        bn_last = cls.head_bn_last if bn_last is None else bn_last
        return ProjectionHead(backbone.out_dim, cfg.head_hidden, cfg.emb, bn_last=bn_last, layers=cfg.head_layers)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """ValueError naming the field for settings of this method that cannot work."""

    @classmethod
    def check_processes(cls, cfg: Config, world_size: int) -> None:
        """ValueError when ``cfg``'s batch cannot be split over ``world_size`` processes for this method."""

    @classmethod
    def nonfinite_hints(cls, cfg: Config) -> list[str]:
        """Causes of a non-finite loss that ``cfg``'s settings of this method make likely (for the abort message)."""
        return []

    # ------------------------------------------------------------------ the step

    def embed(self, views: Sequence[Tensor]) -> list[Tensor]:
        """Head outputs of every view: d tensors (N, C, S, S) -> d tensors (N, emb).

        One forward pass over the K = N*d concatenated images, then split back per view.
        """
        return list(self.head(self.backbone(torch.cat(list(views)))).chunk(len(views)))

    def loss(self, views: Sequence[Tensor], ctx: ProcessContext = ONE_PROCESS) -> Tensor:
        """Scalar loss of d augmented views, each (N, C, S, S) float, of the same N images: this process's
        share of the batch, gathering across processes with ``ctx.gather`` what the loss couples (whitening,
        negatives); random draws from ``ctx.generator``. A loss that is a mean over images gathers nothing:
        DDP's gradient average then equals the global-batch gradient."""
        raise NotImplementedError

    def gathered_embeddings(self, views: Sequence[Tensor], ctx: ProcessContext) -> Tensor:
        """Every process's embeddings of its views, as one (d, N, D) tensor of the global batch in rank order;
        gradients flow back to each process's own part (for losses computed on the global batch)."""
        return ctx.gather(torch.stack(self.embed(views)), 1)

    def forward(self, views: Sequence[Tensor], ctx: ProcessContext = ONE_PROCESS) -> Tensor:
        """Same as :meth:`loss` (so DDP wrappers see the computation in ``forward``)."""
        return self.loss(views, ctx)

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


class EmbeddingMethod(Method):
    """A method whose loss is a function of the views' embeddings alone: :meth:`embedding_loss`.

    Its multi-process behaviour is one attribute: ``gather`` True computes the loss on the embeddings of
    the whole batch, gathered from every process (the loss and gradient of one process on the global
    batch; random draws shared by all processes), False on each process's own embeddings (its own draws).
    """

    gather: bool = False

    def embedding_loss(self, z: Sequence[Tensor] | Tensor, generator: torch.Generator | None) -> Tensor:
        """Scalar loss of d embeddings (N, D) of the same N images (a list, or one (d, N, D) tensor);
        ``generator`` draws the method's random choices (None: the global RNG)."""
        raise NotImplementedError

    def loss(self, views: Sequence[Tensor], ctx: ProcessContext = ONE_PROCESS) -> Tensor:
        check_views(views, getattr(self, "n_views", None))
        if self.gather:
            z = self.gathered_embeddings(views, ctx)
        else:
            z = torch.stack(self.embed(views))
        return self.embedding_loss(z, ctx.generator(shared=self.gather, device=z.device))


METHODS: Registry[Any] = Registry("method")
