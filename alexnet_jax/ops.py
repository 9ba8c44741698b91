"""LRN and overlapping max-pooling written for XLA: the same functions as their plain
definitions (the paper's LRN formula, `flax.linen.max_pool`), with backward passes written out
(`jax.custom_vjp`) as a few fused elementwise loops.

XLA differentiates the plain definitions into a banded matmul (LRN's channel sum) and a
select-and-scatter (max-pooling). Here the channel sum is five shifted slices, d^-3/4 is two
square roots, and the pooling gradient is a sum of shifted grids per phase of the stride, which
XLA's CPU backend runs faster (docs/performance.md). The model traces the plain definitions
instead for the ops named in `AlexNet.plain_ops`: for ablations (benchmarks/train_step.py
--plain_ops) and to rule the fast ones out when a result looks wrong.
tests/test_ops.py holds both to `jax.grad` of the plain definitions, ties in pooling windows
included.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Paper section 3.3 (alpha is not divided by n).
LRN_K, LRN_N, LRN_ALPHA, LRN_BETA = 2.0, 5, 1e-4, 0.75
PLAIN_CHOICES = ("lrn", "pool")  # what AlexNet(plain_ops=...) may trace plainly
# model.fast_ops='auto': the ops whose custom backward passes run, per backend, with the evidence
# for each choice: fast_ops.json beside this file, which a measured run rewrites
# (benchmarks/accelerator.py --parts=step --record_fast_ops; docs/performance.md).
FAST_OPS_TABLE = Path(__file__).with_name("fast_ops.json")


def read_fast_ops(path: Path = FAST_OPS_TABLE) -> dict[str, tuple[str, ...]]:
    """{backend: the ops whose custom backward passes run there} from the table at `path`."""
    table = json.loads(path.read_text())
    return {backend: tuple(row["fast"]) for backend, row in table.items()}


AUTO_FAST = read_fast_ops()
FAST_CHOICES = ("auto", "all", "none", *PLAIN_CHOICES)


def plain_for(fast_ops: str, backend: str) -> tuple[str, ...]:
    """The ops to trace plainly under model.fast_ops: 'auto' (AUTO_FAST for `backend`; all
    fast on a backend not listed), 'all', 'none', or one op's name (that one fast)."""
    if fast_ops == "auto":
        fast = AUTO_FAST.get(backend, PLAIN_CHOICES)
    else:
        fast = {"all": PLAIN_CHOICES, "none": ()}.get(fast_ops, (fast_ops,))
    return tuple(op for op in PLAIN_CHOICES if op not in fast)


def local_response_norm(x: jax.Array, towers: int, plain: bool = False) -> jax.Array:
    """Paper section 3.3 within each tower, in float32: `lrn`, or `plain_lrn`."""
    return plain_lrn(x, towers) if plain else lrn(x, towers)


def pool(x: jax.Array, window: int, stride: int, plain: bool = False) -> jax.Array:
    """VALID max-pooling: `max_pool`, or `plain_max_pool`."""
    return plain_max_pool(x, window, stride) if plain else max_pool(x, window, stride)


def plain_lrn(x: jax.Array, towers: int) -> jax.Array:
    """The plain definition: the channel sum as a banded matmul, d^-beta as a power."""
    x = x.astype(jnp.float32)
    c = x.shape[-1]
    i = np.arange(c)
    tower = i // (c // towers)
    band = (np.abs(i[:, None] - i[None, :]) <= LRN_N // 2) & (tower[:, None] == tower[None, :])
    s = jnp.einsum("...c,cd->...d", x * x, jnp.asarray(band, jnp.float32), precision="highest")
    return x * (LRN_K + LRN_ALPHA * s) ** -LRN_BETA


def plain_max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """The plain definition, whose gradient XLA computes with a select-and-scatter."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID"
    )


def channel_window_sum(x: jax.Array, towers: int, n: int = LRN_N) -> jax.Array:
    """sum over the n adjacent channels (zero beyond the edges) of the same tower."""
    *lead, c = x.shape
    per = c // towers
    half = n // 2
    t = x.reshape(*lead, towers, per)
    t = jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(half, half)])
    total = sum(t[..., i : i + per] for i in range(n))
    return total.reshape(*lead, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def lrn(x: jax.Array, towers: int) -> jax.Array:
    """b = a / (k + alpha * sum_{adjacent channels of the same tower} a^2)^beta, in float32."""
    return _lrn_forward(x, towers)[0]


def _lrn_forward(x: jax.Array, towers: int) -> tuple[jax.Array, tuple]:
    like = jnp.zeros((), x.dtype)  # the input's dtype, which its gradient takes
    x = x.astype(jnp.float32)
    d = LRN_K + LRN_ALPHA * channel_window_sum(x * x, towers)
    p = _power(d)
    return x * p, (x, p, d, like)


def _power(d: jax.Array) -> jax.Array:
    """d^-beta; for the paper's beta = 3/4 as rsqrt(d) * sqrt(rsqrt(d)), within a few float32
    roundings of pow and a fraction of its time on the CPU."""
    if LRN_BETA == 0.75:
        r = lax.rsqrt(d)
        return r * jnp.sqrt(r)
    return d**-LRN_BETA


def _lrn_bwd(towers: int, res: tuple, g: jax.Array) -> tuple[jax.Array]:
    # y_i = x_i d_i^-beta with d_i = k + alpha sum_{j near i} x_j^2; the window is symmetric:
    # dx_m = g_m p_m - 2 alpha beta x_m sum_{i near m} g_i x_i p_i / d_i.
    # Computed in float32 and rounded once to the input's dtype, as JAX's own gradient of
    # plain_lrn is: a bfloat16 model's backward convolutions stay bfloat16.
    x, p, d, like = res
    t = channel_window_sum(g * x * p / d, towers)
    return ((g * p - (2 * LRN_ALPHA * LRN_BETA) * x * t).astype(like.dtype),)


lrn.defvjp(_lrn_forward, _lrn_bwd)


def _window_slice(x: jax.Array, i: int, j: int, out: tuple[int, int], stride: int) -> jax.Array:
    """x[:, i + stride * a, j + stride * b, :] for every output position (a, b)."""
    n, _, _, c = x.shape
    end = (n, i + stride * (out[0] - 1) + 1, j + stride * (out[1] - 1) + 1, c)
    return lax.slice(x, (0, i, j, 0), end, (1, stride, stride, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """VALID max-pooling of NHWC `x` over window x window patches, `stride` apart."""
    return plain_max_pool(x, window, stride)


def _pool_fwd(x: jax.Array, window: int, stride: int) -> tuple[jax.Array, tuple]:
    y = max_pool(x, window, stride)
    return y, (x, y)


def _pool_bwd(window: int, stride: int, res: tuple, g: jax.Array) -> tuple[jax.Array]:
    # Each output's gradient goes to the first maximum of its window in row-major order, as
    # XLA's select-and-scatter sends it. Input row r = stride * a + i takes from output row a
    # through window row i, so the rows of one phase (r mod stride) take from whole output
    # rows shifted by whole steps: each phase is a sum of shifted grids, and the phases are
    # interleaved once at the end.
    x, y = res
    n, h, w, c = x.shape
    if window < stride:  # some rows would be in no window; AlexNet's pools overlap or tile
        raise NotImplementedError(f"max_pool's gradient needs window >= stride, got {window}")
    out = y.shape[1:3]
    rows, cols = -(-h // stride), -(-w // stride)  # per phase
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), g.dtype)
    phases = [[None] * stride for _ in range(stride)]
    for i in range(window):
        for j in range(window):
            hit = (_window_slice(x, i, j, out, stride) == y) & ~taken
            taken = taken | hit
            part = jnp.where(hit, g, zero)
            ti, tj = i // stride, j // stride  # whole steps the part is shifted by
            pad = [
                (0, 0, 0),
                (ti, rows - out[0] - ti, 0),
                (tj, cols - out[1] - tj, 0),
                (0, 0, 0),
            ]
            part = lax.pad(part, zero, pad)
            q = phases[i % stride]
            q[j % stride] = part if q[j % stride] is None else q[j % stride] + part
    grid = jnp.stack([jnp.stack(q, axis=3) for q in phases], axis=2)  # n, rows, s, cols, s, c
    dx = grid.reshape(n, rows * stride, cols * stride, c)
    return (dx[:, :h, :w, :],)


max_pool.defvjp(_pool_fwd, _pool_bwd)
