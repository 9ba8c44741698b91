"""The one loader switch: input.loader picks the module that makes the batches."""

import dataclasses

import numpy as np

from alexnet_jax import dali_input, input_pipeline, loaders, sources, transforms
from alexnet_jax.batch import Batch


def _digits(loader="tf.data"):
    stats = transforms.Stats((120.0,) * 3, (0.2, 0.02, 0.005), tuple(map(tuple, np.eye(3))))
    p = transforms.Preprocess(stats, 27, 32, on_device=True, loader=loader)
    return sources.digits_source(), p


def test_tf_data_batches_are_typed_batches_of_this_processs_rows():
    source, p = _digits()
    stream = dict(seed=0, batch_size=8, start_step=0, num_steps=2, rows=[1, 2, 5])
    train = list(loaders.train_batches(source, p, **stream))
    assert len(train) == 2 and all(isinstance(b, Batch) for b in train)
    assert train[0].raw and train[0].images.shape == (3, 27, 27, 3) and train[0].weights is None
    evals = list(loaders.eval_batches(source, p, batch_size=64))
    assert evals[-1].weights.min() == 0 and sum(b.weights.sum() for b in evals) == 360


def test_the_loader_named_in_the_config_makes_the_batches(monkeypatch):
    made = []
    for module in (dali_input, input_pipeline):
        for kind in ("train_batches", "eval_batches"):
            fake = lambda *a, m=module.__name__, k=kind, **kw: made.append((m, k)) or iter([])
            monkeypatch.setattr(module, kind, fake)
    for loader in ("tf.data", "dali"):
        source, p = _digits(loader)
        loaders.train_batches(source, p, batch_size=8)
        loaders.eval_batches(source, dataclasses.replace(p), batch_size=8)
    assert made == [
        ("alexnet_jax.input_pipeline", "train_batches"),
        ("alexnet_jax.input_pipeline", "eval_batches"),
        ("alexnet_jax.dali_input", "train_batches"),
        ("alexnet_jax.dali_input", "eval_batches"),
    ]
