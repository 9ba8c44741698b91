"""Checksums of arrays: the same wherever the array lives, changed by any damage."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import checksums


def _tree():
    rng = np.random.default_rng(0)
    return {
        "kernel": rng.normal(size=(8, 6)).astype(np.float32),
        "count": jnp.int32(7),
        "half": jnp.asarray(rng.normal(size=5), jnp.bfloat16),
        "key": jax.random.PRNGKey(3),
    }


def test_a_checksum_is_the_same_on_the_host_and_sharded_over_a_mesh():
    tree = _tree()
    want = checksums.checksums(tree)
    assert sorted(want) == ["count", "half", "kernel", "key"]
    assert len(set(want.values())) == 4 and all(len(v) == 16 for v in want.values())
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    placed = {**tree, "kernel": jax.device_put(tree["kernel"], NamedSharding(mesh, P("data")))}
    assert checksums.checksums(placed) == want
    assert checksums.differing(want, placed) == []


def test_a_changed_bit_and_two_swapped_rows_are_found():
    tree = _tree()
    want = checksums.checksums(tree)
    one_bit = tree["kernel"].copy()
    one_bit.view(np.uint32)[3, 2] ^= 1  # the last bit of one float
    swapped = tree["kernel"][[1, 0, 2, 3, 4, 5, 6, 7]]
    assert not np.array_equal(swapped, tree["kernel"])
    for damaged in (one_bit, swapped):
        assert checksums.differing(want, {**tree, "kernel": damaged}) == ["kernel"]
    assert checksums.differing(want, {"kernel": tree["kernel"]}) == ["count", "half", "key"]


def test_names_are_the_paths_of_the_tree():
    tree = {"params": {"fc6": {"kernel": np.zeros(2, np.float32)}}, "opt": (np.ones(1),)}
    assert sorted(checksums.checksums(tree)) == ["opt/0", "params/fc6/kernel"]
