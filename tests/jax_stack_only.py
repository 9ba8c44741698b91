"""A Python process as a GPU image without TensorFlow would have it: importing any package that
is not part of JAX's stack (jax, flax, optax, orbax-checkpoint, absl-py, ml-collections, numpy
and what they bring) fails, as it would if it were not installed.

    python -c "import jax_stack_only; jax_stack_only.install(); ..."   (tests/ on sys.path)
    python tests/jax_stack_only.py SCRIPT [ARGS...]                     runs SCRIPT so
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys

# The project's dependencies beyond JAX's stack, by top-level import name.
BLOCKED = (
    "tensorflow",
    "tensorflow_datasets",
    "tensorboard",
    "array_record",
    "nvidia",  # DALI
    "sklearn",
    "PIL",
    "torch",
    "matplotlib",
)


class Refuse(importlib.abc.MetaPathFinder):
    """Refuses the BLOCKED packages and everything under them; `refused` lists what was asked."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            self.refused.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: JAX's stack only)")
        return None


def install() -> Refuse:
    """Refuse the BLOCKED imports from now on in this process; none may be imported yet."""
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, f"already imported: {loaded}"
    finder = Refuse()
    sys.meta_path.insert(0, finder)
    return finder


if __name__ == "__main__":
    install()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
