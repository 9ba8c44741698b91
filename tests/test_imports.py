"""The package's imports run one way: down the layers that README.md's layout lists, top to
bottom, so no module imports one that imports it back."""

import ast
import gc
import graphlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "alexnet_jax"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in it (functions included); a name taken
    from the package itself (`from alexnet_jax import UsageError`) counts as its __init__."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module.split(".")
            targets = [base + [a.name] if len(base) == 1 else base for a in node.names]
        else:
            continue
        for parts in targets:
            if parts[0] == "alexnet_jax":
                found.add(parts[1] if len(parts) > 1 and parts[1] in modules else "__init__")
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package modules it imports}.

    CPython 3.11's parser fails ("AST constructor recursion depth mismatch") when a garbage
    collection inside it runs a finalizer, such as asyncio logging the unretrieved exception
    of a task that an earlier test's failed checkpoint read left behind: so collect first and
    parse with the collector off."""
    modules = {p.stem for p in package.glob("*.py")}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return {m: _imports(package / f"{m}.py", modules) - {m} for m in modules}
    finally:
        if enabled:
            gc.enable()


def test_the_package_imports_have_no_cycle():
    graph = import_graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")
    assert set(order) == set(graph)


def test_the_layers():
    graph = import_graph()
    assert graph["errors"] == set()
    assert graph["ops"] == set()
    assert graph["model"] == {"errors", "ops"}  # the model knows no config, data, mesh or file
    assert "train" not in graph["checkpoint"] and "train" not in graph["inference"]
    assert graph["train"] >= {"checkpoint", "parallel", "input_pipeline", "model"}
    assert graph["inference"] >= {"checkpoint", "model", "input_pipeline"}


def _package_with(tmp_path: Path, planted: dict[str, str]) -> Path:
    """A copy of the package with a function importing `planted[module]` added to each module."""
    fake = tmp_path / "alexnet_jax"
    fake.mkdir()
    for p in PACKAGE.glob("*.py"):
        (fake / p.name).write_text(p.read_text())
    for module, name in planted.items():
        path = fake / f"{module}.py"
        path.write_text(path.read_text() + f"\n\ndef f():\n    from alexnet_jax import {name}\n")
    return fake


def test_a_cycle_would_be_found(tmp_path):
    """The check itself can fail: a planted lazy import of train inside checkpoint."""
    fake = _package_with(tmp_path, {"checkpoint": "train"})
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(import_graph(fake)).static_order())


def readme_layers(readme: Path = REPO / "README.md") -> list[str]:
    """The package's modules as README.md's layout lists them, top layer first."""
    text = readme.read_text()
    layout = text[text.index("## Layout") :]
    block = layout[layout.index("```") + 3 :]
    block = block[: block.index("```")]
    return re.findall(r"^  (\w+)\.py\b", block, re.MULTILINE)


def upward_imports(graph: dict[str, set[str]], layers: list[str]) -> list[str]:
    """'a -> b' for every import of a module b listed above a (or beside the package's facade)."""
    rank = {m: i for i, m in enumerate(layers)}
    return sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m != "__init__"
        for d in deps
        if d == "__init__" or rank[d] <= rank[m]
    )


def test_the_readme_lists_every_module_once():
    layers = readme_layers()
    assert len(layers) == len(set(layers))
    assert set(layers) == set(import_graph()) - {"__init__"}


def test_every_import_runs_down_the_layers_of_the_readme():
    assert upward_imports(import_graph(), readme_layers()) == []


def test_an_upward_import_would_be_found(tmp_path):
    """The check itself can fail: a lazy import of metrics planted in paper256, which sits
    below it, and one of the package's facade."""
    fake = _package_with(tmp_path, {"paper256": "metrics", "ops": "UsageError"})
    found = upward_imports(import_graph(fake), readme_layers())
    assert found == ["ops -> __init__", "paper256 -> metrics"]


def test_importing_the_package_loads_neither_tensorflow_nor_orbax():
    code = (
        "import sys, alexnet_jax\n"
        "print(sorted(m for m in ('tensorflow', 'orbax.checkpoint') if m in sys.modules))\n"
        "alexnet_jax.load_checkpoint  # used: now they load\n"
        "print(sorted(m for m in ('tensorflow', 'orbax.checkpoint') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.splitlines()
    assert out == ["[]", "['orbax.checkpoint', 'tensorflow']"]
