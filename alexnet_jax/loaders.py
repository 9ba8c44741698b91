"""The batches of a run, from the loader `input.loader` names: tf.data's streams
(input_pipeline.py) or NVIDIA DALI cutting the crops tf.data chooses (dali_input.py). The one
place that choice is made: the run, --mode=eval and the benchmarks all read through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from alexnet_jax import dali_input, input_pipeline
from alexnet_jax.sources import Source
from alexnet_jax.transforms import Preprocess


def train_batches(source: Source, p: Preprocess, **stream: Any) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the global train batches as NumPy (input_pipeline.train_dataset's
    keyword arguments), from p.loader."""
    if p.loader == "dali":
        return dali_input.train_batches(source, p, **stream)
    ds = input_pipeline.train_dataset(source, p, **stream)
    return input_pipeline.iterate(ds, source.train)


def eval_batches(source: Source, p: Preprocess, **stream: Any) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the eval batches as NumPy (input_pipeline.eval_dataset's keyword
    arguments), from p.loader."""
    if p.loader == "dali":
        return dali_input.eval_batches(source, p, **stream)
    return input_pipeline.iterate(input_pipeline.eval_dataset(source, p, **stream), source.eval)
