"""The package's imports run one way: down the layers that README.md's layout lists, top to
bottom, so no module imports one that imports it back."""

import ast
import gc
import graphlib
import json
import math
import os
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
    assert graph["train"] >= {"checkpoint", "parallel", "loaders", "model"}
    assert "dali_input" not in graph["train"]  # the loader is chosen in loaders.py only
    assert graph["inference"] >= {"checkpoint", "model", "transforms"}
    assert graph["transforms"] <= {"config_checks", "errors"}  # functions of their arguments


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


# What runs on a GPU image with JAX's stack alone (DESIGN.md): the model, the sharded step and
# the checkpoints; the data modules and TensorBoard's writer sit above them.
JAX_STACK = (
    "model",
    "parallel",
    "optimizer",
    "config_checks",
    "batch",
    "device_input",
    "steps",
    "checkpoint",
    "metrics",
)
DATA = (
    "transforms",
    "input_pipeline",
    "input_stats",
    "skiplist",
    "sources",
    "records",
    "splits",
    "loaders",
    "paper256",
    "staging",
    "dali_input",
    "prepare_imagenet",
)


def _reached(graph: dict[str, set[str]], start: tuple[str, ...]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    return seen


def test_the_step_and_the_checkpoints_import_no_data_module():
    assert _reached(import_graph(), JAX_STACK) & set(DATA) == set()


def test_a_data_import_below_the_step_would_be_found(tmp_path):
    fake = _package_with(tmp_path, {"optimizer": "input_pipeline"})
    assert "input_pipeline" in _reached(import_graph(fake), JAX_STACK) & set(DATA)


STEP_WITHOUT_TENSORFLOW = """
import json
import jax_stack_only

finder = jax_stack_only.install()
import jax

jax.config.update("jax_num_cpu_devices", 2)
import numpy as np

from alexnet_jax import checkpoint, config_checks, model, optimizer, parallel, steps  # noqa
from alexnet_jax.batch import Batch
from configs import digits

config = digits.get_config()
config.batch_size, config.model.width, config.mesh.data, config.mesh.model = 4, 0.125, 1, 2
config.input.image_size = config.input.resize_size = 67
config_checks.check_config(config, jax.device_count(), 1)
trainer = steps.Trainer(config, parallel.create_mesh(1, 2))
rng = np.random.default_rng(0)
local = Batch(
    images=rng.normal(size=(4, 67, 67, 3)).astype(np.float32),
    labels=np.arange(4, dtype=np.int32),
    weights=np.ones(4, np.float32),
)
batch = parallel.global_batch(trainer.mesh, local, 4)
state = trainer.init_state(0)
losses = []
for _ in range(3):
    state, sums = trainer.train_step(state, batch)
    losses.append(float(sums["loss"] / sums["count"]))
evals = trainer.eval_step(state.params, batch)
try:
    from alexnet_jax import input_pipeline  # noqa
    data = "imported"
except ModuleNotFoundError as e:
    data = str(e)
print(json.dumps({"losses": losses, "eval_count": float(evals["count"]), "data": data}))
"""


def test_the_train_and_eval_steps_run_with_jax_stack_alone():
    """In a process where TensorFlow, TFDS, array_record, DALI and the project's other
    dependencies beyond JAX's stack cannot be imported (tests/jax_stack_only.py), the step and
    checkpoint modules import and train and eval steps run, the towers split over two devices;
    the data modules cannot be imported there."""
    out = subprocess.run(
        [sys.executable, "-c", STEP_WITHOUT_TENSORFLOW],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert "blocked: JAX's stack only" in result["data"]  # the block holds
    assert result["eval_count"] == 4
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def private_uses(path: Path) -> list[str]:
    """`alias._name` and `from alexnet_jax.m import _name` in `path`, where alias is a
    module of the package as `path` imports it."""
    tree = ast.parse(path.read_text())
    aliases, found = set(), []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("alexnet_jax")
        ):
            for a in node.names:
                if a.name.startswith("_"):
                    found.append(f"{node.module}.{a.name}")
                aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases |= {
                a.asname for a in node.names if a.name.startswith("alexnet_jax.") and a.asname
            }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return sorted(set(found))


def test_the_benchmarks_use_the_package_public_names_only(tmp_path):
    assert {p.name: private_uses(p) for p in (REPO / "benchmarks").glob("*.py")} == {
        p.name: [] for p in (REPO / "benchmarks").glob("*.py")
    }
    planted = tmp_path / "b.py"
    planted.write_text(
        "from alexnet_jax import sources\nfrom alexnet_jax import input_pipeline as ip\n"
        "from alexnet_jax.sources import _x\nsources._y\nip._z\nip.ok\n"
    )
    assert private_uses(planted) == ["alexnet_jax.sources._x", "ip._z", "sources._y"]
