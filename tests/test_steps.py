"""The train state and the steps: one compilation, the scheduled rate, the sums, the sharded
init, bfloat16."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import input_pipeline, input_stats, parallel, sources, steps, transforms
from alexnet_jax.metrics import Accumulator


def _trainer(config):
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.model)
    return steps.Trainer(config, mesh), mesh


def _fixed_batch(config, n=None, on_device=False):
    """The first train batch: float32 images, or uint8 crops to normalise on the device."""
    source = sources.create_source(config.input)
    stats = input_stats.get_stats(source, config.input.resize_size, 100, None)
    preprocess = transforms.Preprocess.from_config(config.input, stats)
    batches = input_pipeline.train_batches(
        source,
        dataclasses.replace(preprocess, on_device=on_device),
        seed=0,
        batch_size=n or config.batch_size,
        start_step=0,
        num_steps=1,
    )
    return next(batches)


def _grad(trainer, batch):
    """The gradient of the mean loss on `batch` without dropout, jitted."""
    loss = lambda p: trainer.loss_fn(p, batch.images, batch.labels, ())[0]
    return jax.jit(jax.grad(loss))


@contextlib.contextmanager
def lowerings(name: str):
    """The jitted functions called `name` that JAX lowers (once per compilation), as seen
    through jax.monitoring's compilation events."""
    seen = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            if kwargs.get("fun_name") == f"jit({name})":
                seen.append(kwargs["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_plateau_scale_changes_only_when_told(tiny):
    config = tiny(**{"optimizer.schedule": "plateau", "optimizer.plateau_patience": 1})
    trainer, mesh = _trainer(config)
    p = trainer.init_state(0).plateau
    p = trainer.update_plateau(p, jnp.float32(0.5))
    assert float(p.scale) == 1.0
    p = trainer.update_plateau(p, jnp.float32(0.5))  # no improvement, patience 1: cut
    assert float(p.scale) == pytest.approx(0.1)
    for _ in range(5):
        p = trainer.update_plateau(p, jnp.float32(0.5))
    assert float(p.scale) == pytest.approx(1e-3)  # the paper's three cuts, then no more


@pytest.mark.parametrize("variant", ["paper", "owt"])
def test_one_step_lowers_the_loss_and_compiles_once(tiny, variant):
    owt = (
        {"model.variant": "owt", "model.towers": 1, "model.lrn": False} if variant == "owt" else {}
    )
    # A step small enough to be a descent step: at 0.01 momentum overshoots on some batches.
    config = tiny(**{"model.dropout_rate": 0.0, "optimizer.learning_rate": 1e-3, **owt})
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    loss_fn = jax.jit(lambda p: trainer.loss_fn(p, batch.images, batch.labels, ())[0])
    loss = lambda s: float(loss_fn(s.params))
    before = loss(state)
    params0 = jax.device_get(state.params)
    sums = Accumulator()  # bounded dispatch, as the training loop does
    with lowerings("_train_step") as compiled:
        for _ in range(3):
            state, metrics = trainer.train_step(state, batch)
            sums.add(metrics)
    assert len(compiled) == 1  # one compilation for every step
    assert int(state.step) == 3
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), params0, jax.device_get(state.params)
    )
    assert all(jax.tree.leaves(changed))
    assert loss(state) < before


def test_the_step_takes_the_scheduled_rate_times_the_plateau_scale(tiny):
    config = tiny(**{"model.dropout_rate": 0.0, "optimizer.schedule": "plateau"})
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    state = state.replace(plateau=state.plateau._replace(scale=jnp.asarray(0.1, jnp.float32)))
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    params = jax.device_get(state.params)
    grads = jax.device_get(_grad(trainer, batch)(state.params))
    state, metrics = trainer.train_step(state, batch)
    lr = 0.01 * 0.1  # optimizer.learning_rate times the plateau's scale
    assert float(metrics["learning_rate"]) == pytest.approx(lr)
    # The first step from zero velocity: w <- w - lr (g + wd w), decay on kernels only.
    for name in params:
        for leaf, wd in (("kernel", 5e-4), ("bias", 0.0)):
            w, g = params[name][leaf], grads[name][leaf]
            want = w - lr * (g + wd * w)
            assert not np.allclose(want, w - 0.01 * (g + wd * w))  # the scale shows
            got = np.asarray(state.params[name][leaf])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"{name}/{leaf}")


def test_a_small_batch_can_be_overfitted(tiny):
    config = tiny(**{"model.dropout_rate": 0.0, "batch_size": 8})
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    sums = Accumulator()  # bounded dispatch, as the training loop does
    for _ in range(150):  # at lr 0.01 the loss oscillates before it settles (~100 steps)
        state, metrics = trainer.train_step(state, batch)
        sums.add(metrics)
    assert float(metrics["top1_errors"]) == 0.0
    assert float(metrics["loss"]) / 8 < 0.05


def test_init_is_sharded_and_the_same_on_every_mesh(tiny):
    ref = jax.device_get(steps.Trainer(tiny(), parallel.create_mesh(1, 1)).init_state(0).params)
    trainer, mesh = _trainer(tiny(**{"mesh.data": 4, "mesh.model": 2}))
    params = trainer.init_state(0).params
    k = params["conv2"]["kernel"]
    assert k.sharding == NamedSharding(mesh, P(None, None, None, "model"))
    assert k.addressable_shards[0].data.shape[-1] == k.shape[-1] // 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ref)


def test_the_paper_rule_is_the_one_the_trainer_uses(tiny):
    """A check that the rate sits inside the velocity in the real step: after a cut of the rate,
    the next update is 0.9 v - lr_new g, not lr_new (0.9 v' + g) as optax.sgd would give."""
    config = tiny(**{"model.dropout_rate": 0.0, "optimizer.weight_decay": 0.0})
    config.optimizer.schedule, config.optimizer.step_every_steps = "step", 1
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    grad = _grad(trainer, batch)
    w0 = jax.device_get(state.params)
    g0 = jax.device_get(grad(state.params))
    state, _ = trainer.train_step(state, batch)  # lr 0.01
    w1 = jax.device_get(state.params)
    g1 = jax.device_get(grad(state.params))
    state, m = trainer.train_step(state, batch)  # lr 0.001: the schedule cut it
    assert float(m["learning_rate"]) == pytest.approx(0.001)
    k = lambda t: np.asarray(t["fc7"]["kernel"], np.float64)
    # Parameter differences carry float32 rounding of w (~1e-3 of the update): norm-relative.
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    v1 = -0.01 * k(g0)
    assert rel(k(w1) - k(w0), v1) < 1e-2
    want = 0.9 * v1 - 0.001 * k(g1)
    sgd = -0.001 * (0.9 * (v1 / -0.01) + k(g1))  # momentum first, then the rate
    assert rel(sgd, want) > 0.5
    assert rel(k(jax.device_get(state.params)) - k(w1), want) < 1e-2


def test_the_step_adds_its_sums_to_the_running_totals(tiny):
    config = tiny(**{"model.dropout_rate": 0.0})
    trainer, mesh = _trainer(config)
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    state = trainer.init_state(0)
    copy = lambda s: jax.tree.map(jnp.copy, s)  # the step donates its state
    _, alone = trainer.train_step(copy(state), batch)
    totals = {k: v + i + 1.0 for i, (k, v) in enumerate(trainer.zero_sums().items())}
    _, added = trainer.train_step(copy(state), batch, totals)
    for k in ("loss", "top1_errors", "top5_errors", "count"):
        assert float(added[k]) == pytest.approx(float(totals[k]) + float(alone[k]), rel=1e-6)
    assert float(added["count"]) == config.batch_size + 4.0  # the totals were not zero
    assert float(added["learning_rate"]) == float(alone["learning_rate"])  # a rate, not summed


def test_bfloat16_compute_follows_float32_over_the_first_steps(tiny):
    """model.dtype=bfloat16 on the real step: parameters stay float32, and the losses of the
    first steps stay within 2% of float32's (bfloat16 keeps 8 bits of mantissa)."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny(**{"model.dtype": dtype, "mesh.data": 2, "mesh.model": 2})
        trainer, mesh = _trainer(config)
        batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
        state = trainer.init_state(0)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
        losses[dtype] = []
        for _ in range(4):
            state, sums = trainer.train_step(state, batch)
            losses[dtype].append(float(sums["loss"] / sums["count"]))
    f32, bf16 = np.array(losses["float32"]), np.array(losses["bfloat16"])
    assert f32[-1] < f32[0]  # the steps move: the comparison can fail
    assert not np.array_equal(f32, bf16)  # bfloat16 did compute in lower precision
    np.testing.assert_allclose(bf16, f32, rtol=0.02)


@pytest.mark.slow  # the full-size model, one step on the CPU
def test_the_papers_one_gpu_comparison_net_takes_a_step():
    from alexnet_jax.batch import Batch
    from configs import alexnet

    config = alexnet.get_config()
    config.model.variant, config.model.towers = "one_gpu", 1
    config.batch_size = config.optimizer.base_batch_size = 2
    config.mesh.data = config.mesh.model = 1
    trainer, mesh = _trainer(config)
    rng = np.random.default_rng(0)
    local = Batch(
        images=rng.normal(0, 50, (2, 227, 227, 3)).astype(np.float32),
        labels=np.array([3, 999], np.int32),
    )
    state = trainer.init_state(0)
    before = jax.device_get(state.params["conv1"]["kernel"])
    assert before.shape == (11, 11, 3, 48)
    state, sums = trainer.train_step(state, parallel.global_batch(mesh, local, 2))
    assert np.isfinite(float(sums["loss"])) and int(state.step) == 1
    assert not np.array_equal(jax.device_get(state.params["conv1"]["kernel"]), before)
