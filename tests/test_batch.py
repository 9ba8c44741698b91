"""The batch: a pytree of named arrays that jit and global_batch take whole."""

import jax
import numpy as np
import pytest

from alexnet_jax import parallel
from alexnet_jax.batch import Batch


def _uint8(n=8):
    rng = np.random.default_rng(0)
    return Batch(
        images=rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8),
        labels=np.arange(n, dtype=np.int32),
        crops=np.zeros((n, 3), np.int32),
        shifts=rng.normal(size=(n, 3)).astype(np.float32),
    )


def test_a_batch_says_its_form_and_size():
    raw = _uint8()
    host = Batch(np.zeros((8, 4, 4, 3), np.float32), np.zeros(8, np.int32))
    assert raw.raw and not host.raw
    assert raw.size == host.size == 8
    assert host.weights is host.crops is host.shifts is None


def test_a_batch_is_a_pytree_whose_empty_fields_stay_empty():
    batch = _uint8()
    assert len(jax.tree.leaves(batch)) == 4  # weights is None: no leaf
    doubled = jax.jit(lambda b: b._replace(labels=b.labels * 2))(batch)
    assert isinstance(doubled, Batch) and doubled.weights is None
    np.testing.assert_array_equal(doubled.labels, batch.labels * 2)


def test_global_batch_places_every_field_and_names_a_short_one():
    mesh = parallel.create_mesh(4, 2)
    batch = _uint8()
    placed = parallel.global_batch(mesh, batch, 8)
    assert isinstance(placed, Batch) and placed.weights is None
    for name in ("images", "labels", "crops", "shifts"):
        got = getattr(placed, name)
        assert got.sharding == parallel.batch_sharded(mesh)
        np.testing.assert_array_equal(got, getattr(batch, name))
    short = batch._replace(shifts=batch.shifts[:4])
    with pytest.raises(ValueError, match="shifts: this process holds 4 rows of the batch"):
        parallel.global_batch(mesh, short, 8)
