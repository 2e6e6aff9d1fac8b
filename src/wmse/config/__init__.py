"""Run configuration: the fields (:mod:`.schema`; methods declare their own), command-line parsing
(:mod:`.fields`), validation against the registries (:mod:`.validate`) and named presets (:mod:`.presets`).

>>> cfg = apply_overrides(get_preset("cifar10-wmse2"), {"epochs": "10", "lr": "1e-3"})
>>> validate(cfg)
"""

from ..data import DATASETS
from ..methods import METHODS
from ..models import ARCHS
from ..schedule import SCHEDULES
from ..whitening import WHITENINGS
from .fields import Field
from .files import read_config_file, write_config_file
from .presets import OFFICIAL_COMMANDS, PRESETS, describe_presets, get_preset, preset_for_dataset
from .schema import Config, RunFields, all_fields, apply_overrides, parse_value
from .validate import PRECISIONS, validate

__all__ = [
    "Config",
    "RunFields",
    "Field",
    "all_fields",
    "PRESETS",
    "OFFICIAL_COMMANDS",
    "METHODS",
    "ARCHS",
    "DATASETS",
    "SCHEDULES",
    "WHITENINGS",
    "PRECISIONS",
    "apply_overrides",
    "describe_presets",
    "get_preset",
    "preset_for_dataset",
    "parse_value",
    "validate",
    "read_config_file",
    "write_config_file",
]
