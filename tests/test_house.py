"""The layout of the package (DESIGN.md, *Layers*): imports only go down, no cycles, no import-time side effects.

The import graph is read from the source with the standard library's ``ast`` (every ``import`` statement,
including those inside functions), so a lazy import cannot hide an upward dependency or a cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import mtml

SRC = Path(mtml.__file__).parent

# lower rank = lower layer; a module may import its own layer or lower ones only
LAYERS: dict[str, int] = {
    "mtml._version": 0, "mtml._checks": 0, "mtml._yaml": 0, "mtml.errors": 0, "mtml.atomic": 0, "mtml.registry": 0,
    "mtml._optional": 0, "mtml._allocator": 0, "mtml._batched_grad": 0,
    "mtml.tasks": 1, "mtml.groups": 1, "mtml.metrics": 1, "mtml.nn": 1, "mtml.weighting": 1, "mtml.meta": 1,
    "mtml.transfer": 1,
    "mtml.datasets": 2, "mtml.sampling": 2,
    "mtml.engine": 3,
    "mtml.report": 4, "mtml.config": 4,
    "mtml.workflows": 5,
    "mtml.cli": 6, "mtml.__main__": 6,
}
LAYER_NAMES = ["base", "core", "data", "engine", "report/config", "workflows", "cli"]
# the package root holds only the face, the base modules and the few modules everything uses
ROOT_MODULES = {"__init__", "__main__", "_version", "_optional", "_checks", "_yaml", "errors", "atomic", "registry",
                "tasks", "groups", "metrics", "sampling", "config",
                "_allocator", "_batched_grad"}  # glibc's malloc thresholds (the CLI's start); weighting+transfer


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The mtml modules ``name`` imports (explicitly, or a package's ``__init__`` when it imports from another
    package: Python runs that first)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.update(t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    for target in list(found):  # importing mtml.x.y from outside mtml.x runs mtml/x/__init__ first
        parts = target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and not (name == parent or name.startswith(parent + ".")):
                found.add(parent)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    for i in range(len(parts), 1, -1):
        rank = LAYERS.get(".".join(parts[:i]))
        if rank is not None:
            return rank
    return None


def test_every_module_has_a_layer() -> None:
    missing = sorted(n for n in _graph() if n != "mtml" and _layer(n) is None)
    assert not missing, f"modules outside the layer table of DESIGN.md: {missing}; add them to LAYERS"


def test_imports_only_go_down() -> None:
    upward = []
    for name, targets in _graph().items():
        if name == "mtml":  # the package face re-exports from every layer
            continue
        for target in targets:
            assert target != "mtml", f"{name} imports the package face; import the defining module instead"
            a, b = _layer(name), _layer(target)
            assert a is not None and b is not None
            if b > a:
                upward.append(f"{name} ({LAYER_NAMES[a]}) -> {target} ({LAYER_NAMES[b]})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state[nxt] == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif state[nxt] == 0:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_packages_use_each_other_through_their_public_names() -> None:
    """A module reaches into another package only through that package's ``__init__`` (its ``__all__``),
    never through one of its private ``_name`` modules."""
    reach = []
    for name, targets in _graph().items():
        for target in targets:
            leaf = target.rpartition(".")[2]
            owner = target.rpartition(".")[0]
            if leaf.startswith("_") and owner != "mtml" and not (name == owner or name.startswith(owner + ".")):
                reach.append(f"{name} -> {target}")
    assert not reach, "imports of another package's private module:\n" + "\n".join(sorted(reach))


def test_the_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: an import inside a function and a relative import are both edges."""
    pkg = tmp_path / "mtml" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("def f():\n    from mtml.workflows import build\n")
    (pkg / "b.py").write_text("from .a import f\n")
    modules = {"mtml.sub.a": pkg / "a.py", "mtml.sub.b": pkg / "b.py", "mtml.workflows": SRC / "workflows"}
    assert _imports("mtml.sub.a", pkg / "a.py", modules) == {"mtml.workflows"}
    assert _imports("mtml.sub.b", pkg / "b.py", modules) == {"mtml.sub.a"}


def test_the_package_root_holds_no_workflow() -> None:
    top = {p.stem for p in SRC.glob("*.py")}
    assert top <= ROOT_MODULES, f"modules at the package root that belong in a subpackage: {sorted(top - ROOT_MODULES)}"


_PROBE = r"""
import importlib, json, pkgutil, sys
import matplotlib, torch
import mtml
backend = matplotlib.get_backend()
state = torch.random.get_rng_state().clone()
from mtml.datasets import DATASETS, FAMILIES
from mtml.meta import ALGORITHMS
from mtml.nn import ARCHITECTURES, BACKBONES
from mtml.transfer import ESTIMATORS, STRATEGIES
from mtml.weighting import WEIGHTINGS
registries = {"datasets": DATASETS, "families": FAMILIES, "algorithms": ALGORITHMS, "architectures": ARCHITECTURES,
              "backbones": BACKBONES, "estimators": ESTIMATORS, "strategies": STRATEGIES, "weightings": WEIGHTINGS}
before = {k: sorted(r.names()) for k, r in registries.items()}
names = sorted(m.name for m in pkgutil.walk_packages(mtml.__path__, "mtml.") if m.name != "mtml.__main__")
for name in names:
    importlib.import_module(name)
after = {k: sorted(r.names()) for k, r in registries.items()}
print(json.dumps({"modules": len(names), "registries_changed": {k: [before[k], after[k]] for k in before
                  if before[k] != after[k]}, "backend": [backend, matplotlib.get_backend()],
                  "pyplot": "matplotlib.pyplot" in sys.modules,
                  "rng_moved": not torch.equal(state, torch.random.get_rng_state())}))
"""


@pytest.mark.slow
def test_importing_any_module_changes_no_global_state() -> None:
    """Registries are filled by their own packages; no backend switch, no pyplot, no global RNG draw."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env={"MPLBACKEND": "svg", "PATH": "/usr/bin:/bin"})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["modules"] > 50  # the walk really imported the package
    assert report["registries_changed"] == {}
    assert report["backend"] == ["svg", "svg"]
    assert not report["pyplot"]
    assert not report["rng_moved"]


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    import torch

    from mtml.config import Config
    from mtml.workflows import build

    config = Config.from_dict({"name": "t", "data": {"dataset": "synthetic", "options": {"num_tasks": 2}},
                               "model": {"trunk_hidden": [8]}, "training": {"max_steps": 1}})
    torch.manual_seed(123)
    state = torch.random.get_rng_state().clone()
    first = build(config)
    assert torch.equal(state, torch.random.get_rng_state())
    torch.manual_seed(999)  # another caller state: the same weights (they follow config.seed)
    second = build(config)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
