"""Checksums of a train state's arrays, computed where the arrays live (a jitted reduction per
array, sharded or not, on any number of processes), saved beside every checkpoint and compared
when one is read back: bytes damaged on disk are named, not trained on.

Each array's 32-bit words are summed twice modulo 2^32, weighted by their position with two
odd multipliers; a changed word, or two words swapped, changes the pair (but for a 2^-64
chance on random damage). Not a cryptographic digest: it guards against damage, not against
tampering.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def path_name(path: tuple) -> str:
    """'params/fc6/kernel' for a tree path, the same for a TrainState and its restored dict."""
    names = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32, one word per element (narrower types widened)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _pair(x: jax.Array) -> jax.Array:
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)  # the row-major position, without a reshape
    for axis, stride in enumerate(np.cumprod((w.shape + (1,))[::-1])[::-1][1:]):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride)
    a = jnp.sum(w * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum((w ^ (index * np.uint32(0x9E3779B9))) * np.uint32(0x85EBCA6B), dtype=jnp.uint32)
    return jnp.stack([a, b])


@jax.jit
def _pairs(tree: Any) -> Any:
    return jax.tree.map(_pair, tree)


def checksums(tree: Any) -> dict[str, str]:
    """{array name: 16 hex digits} for every array of `tree` (jax.Arrays or NumPy)."""
    pairs = jax.device_get(_pairs(tree))
    flat = jax.tree_util.tree_flatten_with_path(pairs)[0]
    return {path_name(path): f"{int(p[0]):08x}{int(p[1]):08x}" for path, p in flat}


def differing(saved: dict[str, str], tree: Any) -> list[str]:
    """The names of `saved`'s arrays whose checksum `tree` does not reproduce (or lacks)."""
    got = checksums(tree)
    return sorted(name for name, value in saved.items() if got.get(name) != value)
