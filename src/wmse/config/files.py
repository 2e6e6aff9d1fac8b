"""A run's settings from a file: ``wmse pretrain --config FILE`` reads a run's ``config.json`` or a JSON / YAML
file of fields, and ``wmse presets --show NAME --write FILE`` writes one.

Values are checked as the command line's are: each is turned into its command-line text and parsed by the
field's type, so ``"epochs": 0.5`` or ``"crop_scale": [0.2]`` is the same one-line error as
``--epochs 0.5``. Keys that start with ``_`` (config.json's provenance: ``_based_on_preset`` ...) are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic
from .schema import Config, parse_value

__all__ = ["read_config_file", "write_config_file"]

_YAML = (".yaml", ".yml")


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ValueError("YAML config files need PyYAML: pip install pyyaml (or pip install 'wmse[yaml]'), "
                         "or give the fields as a .json file") from None
    return yaml


def _as_text(value: Any) -> str:
    """A value read from JSON / YAML as it would be typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(v) for v in value)
    if isinstance(value, dict):
        raise ValueError(f"a nested mapping {value!r} is not a config value")
    return str(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """{field: value} of a JSON or YAML file (keys starting with ``_`` left out), values of the fields' types.

    Raises FileNotFoundError for a missing file and ValueError (one line naming the file and the field) for a
    file that does not parse, is not a mapping, has an unknown field or a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in _YAML:
        yaml = _yaml()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value, not {type(data).__name__}")
    out = {}
    for name, value in data.items():
        if str(name).startswith("_"):
            continue
        try:
            out[str(name)] = parse_value(str(name), _as_text(value))
        except ValueError as exc:
            raise ValueError(f"config file {path}: {exc}") from None
    return out


def write_config_file(cfg: Config, path: str | Path) -> Path:
    """Every field of ``cfg`` into ``path`` (YAML for .yaml / .yml, else JSON), readable by :func:`read_config_file`."""
    data = cfg.to_dict()
    text = _yaml().safe_dump(data, sort_keys=False) if Path(path).suffix.lower() in _YAML else json.dumps(data, indent=2) + "\n"
    return write_text_atomic(Path(path), text)
