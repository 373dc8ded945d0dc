"""The shape of the code a newcomer relies on: lade_core's import graph has no cycle (lazy imports included), and
the paper's math (``lade_core.math``, every module in it) imports nothing but torch, numpy and the standard library."""
from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "lade_core"


def _modules() -> dict[str, object]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path, modules: dict) -> set[str]:
    """The lade_core modules ``name`` imports anywhere in its body (top level or inside a function)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module] if node.level else
                            [node.module or ""]) if node.module else ".".join(package[:len(package) - node.level + 1])
            found |= {m for m in (base, *(f"{base}.{a.name}" for a in node.names)) if m in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    # A package importing its own submodules is not a cycle with them.
    return {m for m in found if m != name and not m.startswith(name + ".")}


def test_lade_core_has_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, f, modules) for m, f in modules.items()}
    assert graph["lade_core.train.loop"] >= {"lade_core.train.checkpoint", "lade_core.serve.inference"}  # it is read
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in path:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            else:
                visit(dep, path + [dep])

    for m in sorted(graph):
        visit(m, [m])
    assert not cycles, sorted(set(cycles))[:10]


def test_the_math_modules_import_only_torch_and_numpy():
    """The paper's math in a fresh interpreter: nothing beyond torch, numpy and the standard library comes in."""
    code = """
import sys
import numpy, torch
before = set(sys.modules)
import importlib, pkgutil
import lade_core.math
names = [m.name for m in pkgutil.iter_modules(lade_core.math.__path__)]
for name in names:
    importlib.import_module(f"lade_core.math.{name}")
assert len(names) >= 10, names
new = {m.split('.')[0] for m in set(sys.modules) - before}
print(sorted(new - set(sys.stdlib_module_names) - {'lade_core'}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]", p.stdout


# What the math tier may import from the rest of lade, lazy imports included: the registry (standard library only).
# One exception, lazily: ``label_shift.source_logits`` asks the declarations which post-hoc rule a loss name's logits
# need (a caller holding a model card passes the rule itself).
MATH_MAY_IMPORT = {"lade_core.registry"}
MATH_LAZY_EXCEPTIONS = {("lade_core.math.label_shift", "lade_core.methods")}


def test_the_math_tier_imports_nothing_of_lade_outside_itself():
    """No math module reaches up to the declarations, the config, the data, the MLflow glue or ``compat`` (the
    static graph: a lazy import inside a function counts)."""
    modules = _modules()
    outside = sorted((m, dep) for m, f in modules.items() if m.startswith("lade_core.math")
                     for dep in _imports(m, f, modules)
                     if not dep.startswith("lade_core.math") and dep not in MATH_MAY_IMPORT | {"lade_core"}
                     and (m, dep) not in MATH_LAZY_EXCEPTIONS)
    assert "lade_core.math.losses.base" in modules and "lade_core.math.evaluation" in modules  # the scan sees them
    assert not outside, outside


# The MLflow glue: what a run stores (artifacts), runs and metrics (tracking), the logged model (serving) and the
# file MLflow runs to serve it. Every other module and script reaches MLflow through them.
MLFLOW_GLUE = {"lade_core.tracking.store", "lade_core.tracking.artifacts", "lade_core.tracking.model",
               "lade_core.tracking.pyfunc_entry"}


def test_only_the_mlflow_glue_imports_mlflow():
    files = {**_modules(), **{f"pipelines.{f.stem}": f for f in (REPO / "pipelines").glob("*.py")}}
    importers = set()
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(name)
    assert "pipelines.train" in files and "lade_core.train.driver" in files  # the scan sees the scripts and the library
    assert importers == MLFLOW_GLUE, sorted(importers ^ MLFLOW_GLUE)


def test_the_layout_shows_the_concepts_and_no_module_is_an_alias():
    """At most 8 modules at lade_core's top level, the rest in concept subpackages; no module puts itself in
    ``sys.modules`` under a second name."""
    top = sorted(f.name for f in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    assert {"math", "config", "data", "models", "train", "tune", "tracking", "serve"} <= {
        d.name for d in PACKAGE.iterdir() if (d / "__init__.py").exists()}
    aliasing = [name for name, f in _modules().items() if "sys.modules[" in f.read_text()]
    assert not aliasing, aliasing


def test_the_paths_stored_artifacts_name_are_the_modules_that_hold_their_names():
    """``lade_core.tuning`` (a search's tuner.pkl) and ``lade_core.serving`` (a registered model's entry file) are
    the modules that hold those names now, whichever is imported first and however; no other old path imports."""
    code = """
import importlib, sys
import lade_core
for i, (old, new) in enumerate(lade_core.STORED_PATHS.items()):
    first, second = (old, new)[::(1 if i % 2 else -1)]
    importlib.import_module(first)
    importlib.import_module(second)
    assert sys.modules[old] is sys.modules[new], old
    assert sys.modules[new].__spec__.name == new, sys.modules[new].__spec__
    exec(f"from lade_core import {old.rsplit('.', 1)[1]} as m", globals())
    assert m is sys.modules[new], old
for gone in ("lade_core.losses", "lade_core.priors", "lade_core.training", "lade_core.inference"):
    try:
        importlib.import_module(gone)
    except ImportError:
        continue
    raise AssertionError(gone + " still imports")
print(len(lade_core.STORED_PATHS))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(p.stdout) == 2
