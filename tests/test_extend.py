"""Extension points: a method registered from outside the package trains from the config and the CLI, and
the module graph has no import circles."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from wmse.config import Config, get_preset, validate
from wmse.methods import METHODS, ONE_PROCESS, Method, check_views
from wmse.progress import read_metrics
from wmse.train import pretrain


def _toy_declared():
    """A method in a dozen lines: cosine distance of the two views' embeddings, with one field of its own,
    declared once (the README's way): the constructor and from_config come from the base class."""

    class Toy(Method):
        @dataclass(frozen=True)
        class Options:
            toy_scale: float = 2.0  # a field only this method has

        @classmethod
        def validate_config(cls, cfg):
            if cfg.toy_scale <= 0:
                raise ValueError(f"field 'toy_scale' must be > 0, got {cfg.toy_scale}")

        def loss(self, views, ctx=ONE_PROCESS):  # ctx: the process and step (unused: nothing gathered or drawn)
            check_views(views)
            z1, z2 = self.embed(views)
            return self.toy_scale * (1 - torch.nn.functional.cosine_similarity(z1, z2).mean())

    return Toy


def _toy_own_constructor():
    """The same method written with its own __init__ and from_config (as methods were written before the
    generic from_config): still works."""

    class Toy(_toy_declared()):
        def __init__(self, backbone, head, scale):
            super().__init__(backbone, head)
            self.scale = scale

        @classmethod
        def from_config(cls, cfg, backbone):
            return cls(backbone, cls.default_head(cfg, backbone), cfg.toy_scale)

        def loss(self, views, ctx=ONE_PROCESS):
            check_views(views)
            z1, z2 = self.embed(views)
            return self.scale * (1 - torch.nn.functional.cosine_similarity(z1, z2).mean())

    return Toy


@pytest.fixture(params=[_toy_declared, _toy_own_constructor], ids=["declared", "own-constructor"])
def toy_method(request):
    toy = METHODS.register("toy")(request.param())
    yield toy
    METHODS.remove("toy")


def test_a_method_registered_outside_the_package_trains_a_step(toy_method, tiny_folder, tmp_path, make_config):
    cfg = make_config(tiny_folder, tmp_path, method="toy", toy_scale=3.0, epochs=1, max_steps=1)
    assert cfg.toy_scale == 3.0 and Config().toy_scale == 2.0
    run = pretrain(cfg, log=lambda m: None)
    (record,) = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert 0.0 <= record["loss"] <= 2 * 3.0 and record["step"] == 1
    with pytest.raises(ValueError, match="toy_scale"):
        validate(cfg.replace(toy_scale=-1.0))


def test_registered_method_fields_reach_the_cli(toy_method, tiny_folder, tmp_path, capsys):
    from wmse.cli import main

    assert main(["presets", "--show", "quick"]) == 0
    assert "toy_scale" in capsys.readouterr().out
    assert main(["pretrain", "--preset", "quick", "--method", "toy", "--toy_scale", "abc"]) == 2
    assert "field 'toy_scale' expects a float" in capsys.readouterr().err


def test_a_declared_field_is_a_keyword_argument_and_an_attribute():
    from wmse.models import ProjectionHead, SmallConvNet

    toy = _toy_declared()
    backbone = SmallConvNet(1, out_dim=8)
    assert toy(backbone, ProjectionHead(8, 8, 4)).toy_scale == 2.0
    assert toy(backbone, ProjectionHead(8, 8, 4), toy_scale=5.0).options() == toy.Options(toy_scale=5.0)
    with pytest.raises(TypeError, match="Toy has no option 'scale'; its options: toy_scale"):
        toy(backbone, ProjectionHead(8, 8, 4), scale=5.0)


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of wmse, contrastive, byol"):
        validate(get_preset("quick").replace(method="nope"))


def _imports(path: Path, package: str) -> set[str]:
    """wmse modules ``path`` imports at run time (TYPE_CHECKING blocks excluded, function-level included)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
        found.add(target)
        if not node.module:  # from . import x: x may be a module
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def test_no_import_circles():
    src = Path(__file__).resolve().parents[1] / "src" / "wmse"
    modules = {}
    for path in src.rglob("*.py"):
        rel = path.relative_to(src.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        modules[name] = _imports(path, package)
    graph = {m: {t for t in deps if t in modules and t != m} for m, deps in modules.items()}
    # A package's __init__ re-exports its submodules: importing a submodule also runs the package, so an
    # edge to "pkg.sub" is an edge to "pkg" for cycle purposes, except from inside the package itself.
    for m in graph:
        graph[m] |= {t.rsplit(".", 1)[0] for t in graph[m] if "." in t and t.rsplit(".", 1)[0] in modules
                     and not m.startswith(t.rsplit(".", 1)[0])}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_every_name_in_every_all_resolves():
    """`from wmse.x import *` works for every module: each name its __all__ lists exists."""
    import importlib
    import pkgutil

    import wmse

    modules = [wmse] + [importlib.import_module(m.name)
                        for m in pkgutil.walk_packages(wmse.__path__, "wmse.") if m.name != "wmse.__main__"]
    assert len(modules) > 40
    missing = [f"{m.__name__}.{name}" for m in modules for name in getattr(m, "__all__", ()) if not hasattr(m, name)]
    assert not missing
    for m in modules:  # what `import *` itself does
        exec(f"from {m.__name__} import *", {})
