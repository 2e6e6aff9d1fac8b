"""The Method base class and the METHODS registry.

A method owns an encoder (``backbone``) and a projection head (``head``) and turns a list of augmented
views into a scalar loss. The training loop calls, per step::

    loss = method.loss(views)          # views: d tensors (N, C, S, S), one per view
    loss.backward(); optimizer.step()  # optimizer over method.trainable_parameters()
    method.on_step(step, total_steps)  # BYOL: EMA update of its target network

and evaluation calls ``method.features(images)`` (backbone output, no head) on frozen weights.

A method is one class in one module, registered by name (``@METHODS.register("name")``). It declares
its own config fields once, in a nested ``Options`` dataclass, each name carrying the method's prefix (they
become ``--field`` on the command line, ``cfg.field`` in the config, keyword arguments of the constructor
with the same defaults, and attributes ``self.field``); it checks them in :meth:`Method.validate_config`, is
built from a config by the generic :meth:`Method.from_config`, and owns its multi-process behaviour:
:meth:`Method.distributed_loss` (what it gathers across processes), :meth:`Method.check_processes` (how a
batch may be split) and ``sync_bn_modules`` (which submodules SyncBatchNorm converts).

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

if TYPE_CHECKING:  # methods never import the config at runtime: the config reads them
    from ..config import Config

__all__ = ["Method", "EmbeddingMethod", "METHODS", "ProcessContext", "step_generator", "view_pairs", "check_views", "mean_over_pairs"]


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


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """CPU generator for a method's random choices at ``step`` (W-MSE's slices): a function of
    (seed, step, rank) only, independent of the global RNG (which rank 0's evaluation consumes).

    Pass rank 0 on every rank for a draw all ranks share, the real rank for a per-rank draw.
    """
    mixed = (int(seed) * 1_000_003 + int(step) * 7_919 + int(rank) * 104_729) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@dataclass
class ProcessContext:
    """Where a loss is computed under multi-process training (given to :meth:`Method.distributed_loss`).

    ``gather(x, dim)``: differentiable all-gather, every rank's ``x`` concatenated along ``dim`` in rank
    order; its backward sums the gradients of all ranks, so a loss whose mean over ranks is the global
    loss gets the single-process gradient on the whole batch (see wmse.distributed).
    """

    rank: int
    world_size: int
    step: int
    seed: int
    gather: Callable[[Tensor, int], Tensor]

    def generator(self, shared: bool) -> torch.Generator:
        """The step's generator: the same on every rank (``shared``) or this rank's own."""
        return step_generator(self.seed, self.step, 0 if shared else self.rank)


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's ``Options`` keeps its parents' fields (its methods read them): TypeError otherwise."""
        super().__init_subclass__(**kwargs)
        have = {f.name for f in dataclasses.fields(cls.Options)}
        for base in cls.__bases__:
            missing = [f.name for f in dataclasses.fields(getattr(base, "Options", Method.Options))
                       if f.name not in have]
            if missing:
                raise TypeError(f"{cls.__name__}.Options must extend {base.__name__}.Options "
                                f"(it lacks {', '.join(missing)})")

    def __init__(self, backbone: nn.Module, head: nn.Module, **options: Any) -> None:
        """``options``: fields of :class:`Options` by name; the others take its defaults. Each becomes an
        attribute (``self.w_size``). An unknown name raises TypeError listing the method's fields. A subclass
        that takes more (``n_views``) takes it by keyword only, so no positional call binds a value silently
        to another parameter."""
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

    def loss(self, views: Sequence[Tensor]) -> Tensor:
        """Scalar loss of d augmented views, each (N, C, S, S) float, of the same N images."""
        raise NotImplementedError

    def gathered_embeddings(self, views: Sequence[Tensor], ctx: ProcessContext) -> Tensor:
        """Every process's embeddings of its views, as one (d, N, D) tensor of the global batch in rank order;
        gradients flow back to each process's own part (for losses computed on the global batch)."""
        return ctx.gather(torch.stack(self.embed(views)), 1)

    def distributed_loss(self, views: Sequence[Tensor], ctx: ProcessContext) -> Tensor:
        """The loss of this process's share of the batch under DDP.

        Default: :meth:`loss` of the local views, right for a loss that is a mean over images (DDP's
        gradient average then equals the global-batch gradient). A loss that couples images (whitening,
        negatives) overrides this and gathers what it needs with ``ctx.gather``.
        """
        return self.loss(views)

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

    def loss(self, views: Sequence[Tensor]) -> Tensor:
        check_views(views, getattr(self, "n_views", None))
        return self.embedding_loss(self.embed(views), None)

    def distributed_loss(self, views: Sequence[Tensor], ctx: ProcessContext) -> Tensor:
        check_views(views, getattr(self, "n_views", None))
        if self.gather:
            return self.embedding_loss(self.gathered_embeddings(views, ctx), ctx.generator(shared=True))
        return self.embedding_loss(torch.stack(self.embed(views)), ctx.generator(shared=False))


METHODS: Registry[Any] = Registry("method")
