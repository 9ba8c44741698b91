"""README.md and docs/ name only what exists: configs, modules, scripts, tests, links and
config keys; and the README's test command is the one CI runs."""

import ast
import re
from pathlib import Path

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = ("model", "input", "optimizer", "mesh")


def _config_keys(name: str) -> set[str]:
    """Every dotted key of configs/`name`."""
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()

    def walk(node, prefix=""):
        for k, v in node.items():
            yield prefix + k
            if hasattr(v, "items"):
                yield from walk(v, f"{prefix}{k}.")

    return set(walk(config))


def _code(text: str) -> list[str]:
    """The lines of fenced code blocks and the inline code spans of a Markdown text."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    lines = [line for b in blocks for line in b.splitlines()]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def problems(text: str, where: Path, root: Path = REPO) -> list[str]:
    """What `text` (Markdown at `where`) names that does not exist under `root`."""
    found = []
    keys = {name: _config_keys(name) for name in ("alexnet", "owt", "digits")}
    any_key = set().union(*keys.values())
    for link in re.findall(r"\]\(([^)#\s]+)\)", text):
        if "://" not in link and not (where.parent / link).exists():
            found.append(f"link {link}")
    for code in _code(text):
        for path, test in re.findall(
            r"((?:configs|benchmarks|tests|notebooks|docs|alexnet_jax)/[\w./-]*\w\.(?:py|ipynb|md|txt))"
            r"(?:::(\w+))?",
            code,
        ):
            if not (root / path).exists():
                found.append(f"file {path}")
            elif test and test not in _test_names(root / path):
                found.append(f"test {path}::{test}")
        for module in re.findall(r"-m alexnet_jax\.(\w+)", code):
            source = root / "alexnet_jax" / f"{module}.py"
            if not source.exists() or '__name__ == "__main__"' not in source.read_text():
                found.append(f"command python -m alexnet_jax.{module}")
        if "launch.py" in code or "benchmarks/" in code or "-m alexnet_jax." in code:
            config = re.search(r"--config=(?:\S*/)?configs/(\w+)\.py", code)
            name = config[1] if config else "owt" if "convert_torchvision" in code else "alexnet"
            for key in re.findall(r"--config\.([\w.]+)", code):
                if key not in keys.get(name, set()):
                    found.append(f"config key {key} (for configs/{name}.py)")
        whole = re.fullmatch(rf"((?:{'|'.join(SECTIONS)})\.\w+)(?:=\S*)?", code.strip())
        if whole and whole[1] not in any_key:
            found.append(f"config key {whole[1]}")
    return found


def test_every_command_config_script_and_key_in_the_docs_exists():
    assert len(DOCS) > 5
    found = {p.name: problems(p.read_text(), p) for p in DOCS}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_check_can_fail(tmp_path):
    """Each kind of name, planted wrong once."""
    text = (
        "See [the page](nope.md) and `tests/test_model.py::test_no_such_test`.\n\n"
        "```bash\n"
        ".venv/bin/python launch.py --config=configs/digits.py --config.model.widht=2\n"
        ".venv/bin/python -m alexnet_jax.nope --workdir=/tmp/x\n"
        ".venv/bin/python benchmarks/no_such_benchmark.py\n"
        "```\n\n"
        "The field `optimizer.momentun` and `model.width`.\n"
    )
    assert problems(text, tmp_path / "page.md") == [
        "link nope.md",
        "config key model.widht (for configs/digits.py)",
        "command python -m alexnet_jax.nope",
        "file benchmarks/no_such_benchmark.py",
        "test tests/test_model.py::test_no_such_test",
        "config key optimizer.momentun",
    ]


def test_the_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^python3 -m venv \.venv && .*-e \"\.\[test\]\".*$", readme, re.M)
    assert command is not None
    assert command[0] in (REPO / ".ci" / "run").read_text()


def _pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {norm(n): v for n, v in (x.split("==") for x in lines if "==" in x)}


def test_the_accelerator_extras_are_pinned_to_what_the_pinned_jax_names():
    """pyproject's cuda12, cuda13 and tpu extras are jax's, and constraints.txt pins every
    package jax's extra asks for (plugin, libtpu) at a version it accepts."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    pins = _pins()
    assert metadata.version("jax") == pins["jax"]
    checked = []
    for extra in ("cuda12", "cuda13", "tpu"):
        assert [Requirement(r).extras for r in extras[extra]] == [{extra}]
        for text in metadata.requires("jax"):
            req = Requirement(text)
            if req.marker is None or not req.marker.evaluate({"extra": extra}):
                continue
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            assert name in pins, f"constraints.txt does not pin {name} (jax[{extra}])"
            assert req.specifier.contains(pins[name]), (extra, name, pins[name], req.specifier)
            checked.append(name)
    assert {"jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu"} <= set(checked)
    # The plugins' own PJRT, at their version.
    assert pins["jax-cuda12-pjrt"] == pins["jax-cuda12-plugin"] == pins["jax"]
    assert pins["jax-cuda13-pjrt"] == pins["jax-cuda13-plugin"] == pins["jax"]
