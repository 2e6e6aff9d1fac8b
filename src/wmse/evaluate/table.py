"""Results as text: the leaves of a nested results dict, and a two-column table of them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping


def flatten(d: Mapping, prefix: str = "", lists: bool = False) -> Iterator[tuple[str, object]]:
    """(dotted.key, value) for every leaf of a nested mapping; lists and tuples only when ``lists``."""
    for key, val in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(val, Mapping):
            yield from flatten(val, name, lists)
        elif lists or not isinstance(val, (list, tuple)):
            yield name, val


def format_table(results: Mapping) -> str:
    """Two-column text table of every scalar in a (nested) results dict; lists are left out.

    Nested keys are joined with dots (``linear.top1``); floats get 2 decimals, or 4 significant
    digits when they are small (losses, learning rates).
    """
    rows = []
    for name, val in flatten(results):
        if isinstance(val, bool) or not isinstance(val, float):
            text = str(val)
        elif val != 0 and abs(val) < 0.1:
            text = f"{val:.4g}"
        else:
            text = f"{val:.2f}"
        rows.append((name, text))
    if not rows:
        return "(no results)"
    width = max(len(n) for n, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    lines = [f"{'metric'.ljust(width)}  {'value'.rjust(vwidth)}", "-" * (width + 2 + vwidth)]
    lines += [f"{n.ljust(width)}  {v.rjust(vwidth)}" for n, v in rows]
    return "\n".join(lines)
