"""The batches of a run, from the loader `input.loader` names: tf.data's streams
(input_pipeline.py) or NVIDIA DALI cutting the crops tf.data chooses (dali_input.py). The one
place that choice is made: the run, --mode=eval and the benchmarks all read through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

from alexnet_jax import dali_input, input_pipeline
from alexnet_jax.batch import Batch
from alexnet_jax.sources import Source
from alexnet_jax.transforms import Preprocess


def _loader(p: Preprocess) -> ModuleType:
    """The module that makes `p.loader`'s batches (config_checks.LOADERS names them)."""
    return dali_input if p.loader == "dali" else input_pipeline


def train_batches(source: Source, p: Preprocess, **stream: Any) -> Iterator[Batch]:
    """This process's rows of the global train batches (input_pipeline.train_dataset's
    keyword arguments), from p.loader: NumPy, or jax.Arrays where DALI decoded on a GPU."""
    return _loader(p).train_batches(source, p, **stream)


def eval_batches(source: Source, p: Preprocess, **stream: Any) -> Iterator[Batch]:
    """This process's rows of the eval batches (input_pipeline.eval_dataset's keyword
    arguments), from p.loader."""
    return _loader(p).eval_batches(source, p, **stream)
