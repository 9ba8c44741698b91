"""Whether the backend JAX runs on computes AlexNet right: benchmarks/accelerator.py --parts=checks.

Each check prints PASS or FAIL with its largest difference and the tolerance, which are the
tests' own (tests/test_ops.py, tests/test_steps.py, tests/test_parallel.py):

- LRN and max-pooling (ops.py) against their plain definitions, values and gradients (XLA's own
  differentiation of the plain ones), in float32 and bfloat16, at conv1's and conv2's shapes
  for the config's model; pooling also on inputs whose windows tie;
- the first train steps in bfloat16 against float32 on the same batch;
- on two or more devices, the towers split over devices (mesh.model=2) against one device:
  loss, every gradient and every optimizer update, norm-relative.

Float32 matmuls and convolutions run at full precision here: GPUs' default (TF32) would hide a
sharding error of the size these tolerances catch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import numpy as np

from alexnet_jax.batch import Batch

BFLOAT16_ROUNDING = 2.0**-7  # one rounding of bfloat16 (8 bits of mantissa), relative
# An input that is the maximum of overlapping 3x3/2 windows (up to four) gets the sum of their
# gradients, added in bfloat16 in another order than XLA's: up to four roundings apart.
POOL_BFLOAT16 = 4 * BFLOAT16_ROUNDING


@dataclasses.dataclass
class Check:
    name: str
    difference: float  # the largest, as `measure` says
    tolerance: float
    measure: str  # how the difference is measured

    @property
    def passed(self) -> bool:
        return bool(self.difference <= self.tolerance)  # NaN fails

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict} {self.name}: {self.measure} {self.difference:.2e} "
            f"(at most {self.tolerance:.0e})"
        )

    def row(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


def rel(a, b) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _value_and_grad(f: Callable, x, g):
    """f(x) and the gradient of sum(f(x) * g), both as float32 NumPy, from one program."""
    import jax
    import jax.numpy as jnp

    def both(x, g):
        y, vjp = jax.vjp(f, x)
        return y, vjp(g.astype(y.dtype))[0]

    y, dx = jax.jit(both)(x, g)
    return np.asarray(y.astype(jnp.float32)), np.asarray(dx.astype(jnp.float32))


def op_checks(
    batch: int, lrn_shape: tuple[int, ...], pool_shape: tuple[int, ...], seed: int = 0
) -> list[Check]:
    """LRN (over two towers) and 3x3/2 max-pooling of ops.py against the plain definitions, on
    `batch` maps of `lrn_shape` and `pool_shape` (H, W, C), in both dtypes."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import ops

    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    checks = []
    for dtype in ("float32", "bfloat16"):
        bf16 = dtype == "bfloat16"
        # LRN where its sum is far from k (the cross-channel terms matter), per tower.
        x = (60.0 * jax.random.normal(next(keys), (batch, *lrn_shape))).astype(dtype)
        g = jax.random.normal(next(keys), x.shape)
        fast = _value_and_grad(lambda x: ops.lrn(x, 2), x, g)
        plain = _value_and_grad(lambda x: ops.plain_lrn(x, 2), x, g)
        value_tol, grad_tol = (BFLOAT16_ROUNDING,) * 2 if bf16 else (1e-6, 1e-5)
        measure = "norm-relative difference"
        checks.append(Check(f"LRN values, {dtype}", rel(fast[0], plain[0]), value_tol, measure))
        checks.append(Check(f"LRN gradient, {dtype}", rel(fast[1], plain[1]), grad_tol, measure))
        # Pooling on real-valued inputs, and on few distinct values (ReLU's zeros), which tie.
        normal = jax.random.normal(next(keys), (batch, *pool_shape))
        ties = jax.random.randint(next(keys), normal.shape, 0, 3).astype(jnp.float32)
        for what, x in (("", normal), (", tied windows", ties)):
            x = x.astype(dtype)
            g = jax.random.uniform(next(keys), ops.max_pool(x, 3, 2).shape, minval=1.0, maxval=2.0)
            fast = _value_and_grad(lambda x: ops.max_pool(x, 3, 2), x, g)
            plain = _value_and_grad(lambda x: ops.plain_max_pool(x, 3, 2), x, g)
            # Values equal. Gradients: float32 as the tests' allclose(rtol=1e-6, atol=1e-6),
            # |a - b| <= 1e-6 (1 + |b|); bfloat16 within POOL_BFLOAT16.
            diff = float(np.max(np.abs(fast[1] - plain[1]) / (1.0 + np.abs(plain[1]))))
            values = max_abs(fast[0], plain[0])
            checks.append(
                Check(f"max-pool values{what}, {dtype}", values, 0.0, "largest difference")
            )
            measure = "largest difference / (1 + |plain|)"
            tol = POOL_BFLOAT16 if bf16 else 1e-6
            checks.append(Check(f"max-pool gradient{what}, {dtype}", diff, tol, measure))
    return checks


def _batch(config, n: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    s = config.input.image_size
    return Batch(
        images=rng.normal(0, 50, (n, s, s, 3)).astype(np.float32),
        labels=rng.integers(0, config.model.num_classes, n).astype(np.int32),
        weights=np.ones(n, np.float32),
    )


def dtype_check(config, steps: int = 4) -> Check:
    """The first `steps` train losses in bfloat16 against float32, the same batch and init,
    one device: within 2% (tests/test_steps.py)."""
    import jax

    from alexnet_jax import parallel
    from alexnet_jax import steps as steps_lib

    mesh = parallel.create_mesh(1, 1)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        c = config.copy_and_resolve_references()
        c.model.dtype, c.mesh.data, c.mesh.model = dtype, 1, 1
        trainer = steps_lib.Trainer(c, mesh)
        batch = parallel.global_batch(mesh, _batch(c, c.batch_size), c.batch_size)
        state = trainer.init_state(0)
        losses[dtype] = []
        for _ in range(steps):
            state, sums = trainer.train_step(state, batch)
            losses[dtype].append(float(jax.device_get(sums["loss"] / sums["count"])))
    f32, bf16 = np.array(losses["float32"]), np.array(losses["bfloat16"])
    worst = float(np.max(np.abs(bf16 - f32) / np.abs(f32)))
    return Check(f"bfloat16 train losses of {steps} steps", worst, 0.02, "relative to float32's")


def sharding_check(config) -> Check | None:
    """Towers split over device pairs (mesh (n/2, 2)) against one device: the loss, every
    gradient and every update, with dropout; None on one device."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import parallel, steps
    from alexnet_jax.optimizer import set_learning_rate

    n = jax.device_count()
    if n < 2:
        return None
    data = n // 2
    c = config.copy_and_resolve_references()
    c.model.dtype, c.model.dropout_rate = "float32", 0.5
    c.batch_size = 2 * data
    local = _batch(c, c.batch_size, seed=1)
    results = []
    with jax.default_matmul_precision("highest"):
        for shape in ((1, 1), (data, 2)):
            c.mesh.data, c.mesh.model = shape
            mesh = parallel.create_mesh(*shape)
            trainer = steps.Trainer(c, mesh)
            state = trainer.init_state(0)
            batch = parallel.global_batch(mesh, local, c.batch_size)
            masks = parallel.dropout_masks(
                jax.random.PRNGKey(3), trainer.model, c.batch_size, c.input.image_size, mesh
            )
            grad_fn = jax.jit(jax.value_and_grad(trainer.loss_fn, has_aux=True))
            (_, sums), grads = grad_fn(state.params, batch.images, batch.labels, masks)
            opt_state = set_learning_rate(state.opt_state, jnp.float32(0.01))
            updates = jax.jit(partial(_two_updates, trainer.optimizer.tx))(
                grads, opt_state, state.params
            )
            results.append(jax.device_get((sums["loss"], grads, updates)))
    (loss0, grads0, up0), (loss1, grads1, up1) = results
    worst = abs(float(loss1) - float(loss0)) / abs(float(loss0))
    for a, b in ((grads1, grads0), (up1, up0)):
        worst = max([worst, *jax.tree.leaves(jax.tree.map(rel, a, b))])
    return Check(
        f"towers split over mesh ({data}, 2) against one device: loss, gradients, updates",
        worst,
        1e-5,
        "largest norm-relative difference",
    )


def _two_updates(tx, grads, opt_state, params):
    """The second of two updates with the same gradients, so momentum takes part."""
    import optax

    updates, opt_state = tx.update(grads, opt_state, params)
    return tx.update(grads, opt_state, optax.apply_updates(params, updates))[0]


def run(config, batch: int) -> list[Check]:
    """Every check for `config`'s model, the ops at `batch` images, printed as they finish."""
    from alexnet_jax.model import AlexNet

    model = AlexNet.from_config(config.model)
    shapes = dict(model.feature_shapes(config.input.image_size))
    checks = []

    def done(*found: Check | None) -> None:
        for check in found:
            if check is not None:
                print(check.line(), flush=True)
                checks.append(check)

    done(*op_checks(batch, shapes["conv1"], shapes["conv2"]))
    done(dtype_check(config))
    done(sharding_check(config))
    return checks
