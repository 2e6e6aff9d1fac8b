"""The run configuration: the fields every run has (:class:`RunFields`) plus the fields each registered
method declares in its ``Options`` dataclass, as one flat :class:`Config`.

Flat on purpose: ``--w_size 256`` on the command line, ``cfg.w_size`` in code and ``"w_size"`` in
config.json and checkpoints, whichever method declared it. A method's fields carry its prefix (``w_``,
``byol_``, ``cw_`` ...); the former names of renamed fields (each method's ``renamed_fields``) are read in
config dicts written before the rename (:meth:`Config.from_dict`), so old config.json files and checkpoints load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..augment.recipe import RECIPE
from .fields import Field, coerce, fields_of, parse_text

__all__ = ["RunFields", "Config", "all_fields", "renamed_fields", "parse_value", "apply_overrides"]


@dataclass(frozen=True)
class RunFields:
    """Every setting of a run that is not a method's own. Defaults are the official CIFAR-10 W-MSE 2 command."""

    # --- what to train
    method: str = "wmse"  # a name of wmse.methods.METHODS
    dataset: str = "cifar10"  # a name of wmse.data.DATASETS
    data_dir: Optional[str] = None  # None -> $WMSE_DATA, else ~/.cache/wmse
    train_split: str = "train"  # split used for pretraining
    eval_split: Optional[str] = "test"  # None -> a held-out part of train_split (see holdout)
    clf_split: Optional[str] = None  # labelled split the kNN/linear probe fit on; None -> train_split
    holdout: float = 0.1  # fraction per class held out when eval_split is None (and no eval_data_dir)
    eval_data_dir: Optional[str] = None  # folder datasets: a labelled test folder or archive to score on
    resize: Optional[int] = None  # image-file datasets: shorter side resized to this, centre crop (mixed sizes)
    preset: Optional[str] = None  # name of the preset this config came from (run names, logs)

    # --- model
    image_size: Optional[int] = 32  # side of training crops; selects the ResNet stem; None: the images' side
    arch: str = "resnet18"  # a name of wmse.models.ARCHS
    emb: int = 64  # output size of the projection head
    head_hidden: int = 1024
    head_layers: int = 2  # Linear layers of the projection head (2: Linear-BN-ReLU-Linear, W-MSE's)
    n_views: int = 2  # d: augmented views per image
    normalize: bool = True  # False: plain MSE / unnormalised logits (official --no_norm)

    # --- optimisation
    optimizer: str = "adam"  # a name of wmse.optim.OPTIMIZERS: adam (the paper) | sgd
    momentum: float = 0.9  # sgd
    epochs: int = 1000
    batch_size: int = 512  # N images per step (global), each giving n_views views
    lr: float = 3e-3
    weight_decay: float = 1e-6
    warmup_iters: int = 500  # linear lr warm-up over the first iterations
    schedule: str = "step"  # "step": x lr_drop_factor at lr_drop_epochs; "cosine"
    lr_end_factor: float = 0.0  # cosine: the lr falls to lr * lr_end_factor at the last step
    lr_drop_epochs: Optional[tuple[int, ...]] = None  # None -> (epochs-50, epochs-25) clipped to >= 0
    lr_drop_factor: float = 0.2

    # --- augmentation (the paper's recipe: wmse.augment.recipe.RECIPE)
    crop_scale: tuple[float, float] = RECIPE.crop_scale
    crop_ratio: tuple[float, float] = RECIPE.crop_ratio
    jitter: tuple[float, float, float, float] = RECIPE.jitter  # brightness, contrast, saturation, hue
    jitter_p: float = RECIPE.jitter_p
    grayscale_p: float = RECIPE.grayscale_p
    flip_p: float = RECIPE.flip_p
    solarize_p: tuple[float, ...] = RECIPE.solarize_p  # per view (the last repeats): RandomSolarize(128) after the crop
    eval_resize: Optional[int] = None  # evaluation: resize shorter side to this, then centre-crop eval_size
    eval_size: Optional[int] = None  # None -> image_size

    # --- execution
    precision: str = "bf16"  # "bf16" autocast | "fp32"
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    threads: Optional[int] = None  # torch CPU threads; None -> torch's default
    sync_bn: bool = False  # DDP: synchronise BatchNorm statistics across processes
    sync_every: Optional[int] = None  # steps between host reads of the loss; >1 skips non-finite steps on the
    #   device (fused Adam); none: 1 on the CPU, log_every on a GPU
    augment_batches: int = 1  # batches augmented per call (amortises kernel launches on a GPU)

    # --- output, evaluation, checkpoints
    out_dir: str = "runs"
    run_name: Optional[str] = None  # None -> preset name + timestamp
    eval_every: int = 5  # epochs between kNN evaluations
    knn_k: int = 5
    eval_max_train: Optional[int] = 10000  # subsample of the kNN train set in periodic evaluations
    ckpt_every: int = 10  # epochs between checkpoints
    log_every: int = 50  # steps between training log lines
    max_steps: Optional[int] = None  # stop after this many steps (tests, demos)
    max_minutes: Optional[float] = None  # stop (checkpoint, resumable) after this much training time
    nonfinite_limit: int = 10  # abort after this many consecutive non-finite losses
    final_eval: bool = False  # at the end: kNN + linear probe, trained vs random-init encoder
    linear_epochs: int = 500


_RUN_FIELDS = fields_of(RunFields, "run")
_cache: dict[tuple, dict[str, Field]] = {}


def all_fields() -> dict[str, Field]:
    """Every config field: the run's, then each registered method's, in registration order.

    Raises ValueError when two declarations of one name disagree on its type or default.
    """
    from ..methods import METHODS  # the registry of methods, each declaring its Options

    key = tuple((name, cls) for name, cls in METHODS.items())
    if key not in _cache:
        table: dict[str, Field] = {}
        for f in _RUN_FIELDS + [f for name, cls in key for f in fields_of(cls.Options, name)]:
            known = table.get(f.name)
            if known is not None and known != f:
                raise ValueError(f"config field {f.name!r} is declared by {known.owner} as {known.type} = "
                                 f"{known.default!r} and by {f.owner} as {f.type} = {f.default!r}")
            table.setdefault(f.name, f)
        _cache.clear()
        _cache[key] = table
    return _cache[key]


def renamed_fields() -> dict[str, str]:
    """Former names of config fields, {old: new}, from every registered method's ``renamed_fields``.

    Raises ValueError when two methods claim one former name for different fields.
    """
    from ..methods import METHODS

    table: dict[str, str] = {}
    for name, cls in METHODS.items():
        for old, new in cls.renamed_fields.items():
            if table.setdefault(old, new) != new:
                raise ValueError(f"former config field {old!r} is renamed {table[old]!r} and, by {name}, {new!r}")
    return table


def _current_names(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (a config dict written before some fields were renamed) with each former name replaced by the
    field's current name; a key that is a current field is kept as it is."""
    table, renamed = all_fields(), renamed_fields()
    out = {k: v for k, v in d.items() if k in table or k not in renamed}
    for k, v in d.items():
        if k not in table and k in renamed:
            out.setdefault(renamed[k], v)
    return out


def _unknown(names) -> ValueError:
    renamed = renamed_fields()
    names = [f"{n!r} (now {renamed[n]!r})" if n in renamed else repr(n) for n in sorted(names)]
    if len(names) == 1:
        return ValueError(f"unknown config field {names[0]}; see `wmse presets --show NAME`")
    return ValueError(f"unknown config field(s) {', '.join(names)}; see `wmse presets --show NAME`")


class Config:
    """Every setting of a pretraining run, one attribute per field of :func:`all_fields`.

    ``Config(**fields)``: unnamed fields take their defaults (the official CIFAR-10 W-MSE 2 command).
    Unknown names raise ValueError. Fields a method registered after this object was made read as their
    defaults.
    """

    def __init__(self, **values: Any) -> None:
        table = all_fields()
        unknown = set(values) - set(table)
        if unknown:
            raise _unknown(unknown)
        for name, f in table.items():
            object.__setattr__(self, name, values.get(name, f.default))

    def __getattr__(self, name: str) -> Any:  # only reached for names not set in __init__
        f = all_fields().get(name)
        if f is None:
            raise AttributeError(f"Config has no field {name!r}")
        return f.default

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in all_fields():
            raise _unknown([name])
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.values().items()}

    def values(self) -> dict[str, Any]:
        """All fields as they are (tuples stay tuples)."""
        return {name: getattr(self, name) for name in all_fields()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`. Unknown keys raise ValueError; strings are parsed by field type; the
        former names of renamed fields (configs of earlier versions) are read as their current names."""
        table = all_fields()
        d = _current_names(d)
        unknown = set(d) - set(table)
        if unknown:
            names = sorted(unknown)
            raise ValueError(f"unknown config field(s) {names}; known fields: {sorted(table)}")
        return cls(**{k: coerce(table[k], v) for k, v in d.items()})

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (unknown names raise ValueError)."""
        unknown = set(changes) - set(all_fields())
        if unknown:
            raise _unknown(unknown)
        return Config(**{**self.values(), **changes})

    def changed(self, other: Config) -> dict[str, Any]:
        """The fields whose value differs from ``other``'s: {name: value here}."""
        mine, theirs = self.values(), other.values()
        return {k: v for k, v in mine.items() if theirs.get(k) != v}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.values() == other.values()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        diff = self.changed(Config())
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in diff.items()) + ")"


def parse_value(name: str, text: str) -> Any:
    """Parse the command-line string ``text`` for the field ``name`` according to its type (see
    :func:`wmse.config.fields.parse_text`)."""
    f = all_fields().get(name)
    if f is None:
        raise _unknown([name])
    return parse_text(f, text)


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
    """``cfg`` with fields replaced by command-line strings, e.g. ``{"lr": "1e-3", "crop_scale": "0.2,1"}``.

    Raises ValueError naming the field for unknown fields and unparsable values.
    """
    return cfg.replace(**{name: parse_value(name, text) for name, text in overrides.items()})
