"""Train state, the paper's update rule, schedules, metrics, the step, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import UsageError, input_pipeline, parallel, sources, train


def _trainer(config):
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.model)
    return train.Trainer(config, mesh), mesh


def _fixed_batch(config, n=None):
    source = sources.create_source(config.input)
    stats = input_pipeline.get_stats(source, config.input, None)
    ds = input_pipeline.train_dataset(
        source,
        config.input,
        stats,
        seed=0,
        batch_size=n or config.batch_size,
        start_step=0,
        num_steps=1,
    )
    return next(ds.as_numpy_iterator())


@pytest.mark.parametrize("mesh_model", [1, 2])
def test_top_k_error_matches_numpy(mesh_model):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    mesh = parallel.create_mesh(1, mesh_model)
    split = mesh_model > 1

    def local(lg, lb):
        nll, rank = parallel.example_stats(lg, lb, split)
        return nll, rank

    f = jax.shard_map(
        local, mesh=mesh, in_specs=(P(None, "model") if split else P(), P()), out_specs=(P(), P())
    )
    nll, rank = jax.jit(f)(logits, labels)
    order = np.argsort(-logits, axis=1)
    for k in (1, 5):
        want = np.mean([labels[i] not in order[i, :k] for i in range(16)])
        assert 0 < want < 1  # the check can tell errors from hits
        assert np.mean(np.asarray(rank) >= k) == want
    want_nll = -jax.nn.log_softmax(logits)[np.arange(16), labels]
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5)


def test_nan_logits_count_as_errors():
    logits = np.full((4, 10), np.nan, np.float32)
    mesh = parallel.create_mesh(1, 1)
    f = jax.shard_map(
        lambda lg, lb: parallel.example_stats(lg, lb, False)[1],
        mesh=mesh,
        in_specs=(P(), P()),
        out_specs=P(),
    )
    assert np.all(np.asarray(f(logits, np.zeros(4, np.int32))) >= 5)


def test_optimizer_is_the_papers_update_rule(tiny):
    o = tiny().optimizer
    tx = train.make_optimizer(o)
    w = {"fc6": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}}
    state = tx.init(w)
    v = jax.tree.map(jnp.zeros_like, w)
    lr_by_step = [0.01, 0.01, 0.001]  # a cut: the rate inside the velocity matters here
    for i, lr in enumerate(lr_by_step):
        g = jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.3 * (i + 1)), w)
        state = train._set_learning_rate(state, jnp.float32(lr))
        updates, state = tx.update(g, state, w)
        # v <- 0.9 v - wd * lr * w - lr * grad (no decay on biases); w <- w + v
        v = {
            "fc6": {
                "kernel": 0.9 * v["fc6"]["kernel"]
                - 5e-4 * lr * w["fc6"]["kernel"]
                - lr * g["fc6"]["kernel"],
                "bias": 0.9 * v["fc6"]["bias"] - lr * g["fc6"]["bias"],
            }
        }
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, v)
        w = optax.apply_updates(w, updates)


def test_schedules(tiny):
    o = tiny().optimizer
    o.schedule, o.step_every_steps = "step", 10
    s = train.make_schedule(o)
    np.testing.assert_allclose([s(0), s(9), s(10), s(25)], [0.01, 0.01, 0.001, 0.0001], rtol=1e-5)


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
def test_one_step_lowers_the_loss_and_traces_once(tiny, variant):
    owt = (
        {"model.variant": "owt", "model.towers": 1, "model.lrn": False} if variant == "owt" else {}
    )
    # A step small enough to be a descent step: at 0.01 momentum overshoots on some batches.
    config = tiny(**{"model.dropout_rate": 0.0, "optimizer.learning_rate": 1e-3, **owt})
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    batch = parallel.global_batch(mesh, _fixed_batch(config))
    loss = lambda s: float(trainer.loss_fn(s.params, batch["images"], batch["labels"], ())[0])
    before = loss(state)
    params0 = jax.device_get(state.params)
    for _ in range(3):
        state, metrics = trainer.train_step(state, batch)
        train.wait_for(metrics)  # bounded dispatch, as the training loop does
    assert trainer.trace_count == 1  # one compilation for every step
    assert int(state.step) == 3
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), params0, jax.device_get(state.params)
    )
    assert all(jax.tree.leaves(changed))
    assert loss(state) < before


def test_a_small_batch_can_be_overfitted(tiny):
    config = tiny(**{"model.dropout_rate": 0.0, "batch_size": 8})
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    batch = parallel.global_batch(mesh, _fixed_batch(config))
    for _ in range(150):  # at lr 0.01 the loss oscillates before it settles (~100 steps)
        state, metrics = trainer.train_step(state, batch)
        train.wait_for(metrics)  # bounded dispatch, as the training loop does
    assert float(metrics["top1_errors"]) == 0.0
    assert float(metrics["loss"]) / 8 < 0.05


def test_init_is_sharded_and_the_same_on_every_mesh(tiny):
    ref = jax.device_get(train.Trainer(tiny(), parallel.create_mesh(1, 1)).init_state(0).params)
    trainer, mesh = _trainer(tiny(**{"mesh.data": 4, "mesh.model": 2}))
    params = trainer.init_state(0).params
    k = params["conv2"]["kernel"]
    assert k.sharding == NamedSharding(mesh, P(None, None, None, "model"))
    assert k.addressable_shards[0].data.shape[-1] == k.shape[-1] // 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ref)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"input.dataset": "imagenet"}, "input.dataset='imagenet' is unknown"),
        ({"input.image_size": 60}, "Use at least 67"),
        ({"batch_size": 0}, "batch_size=0 must be positive"),
        ({"batch_size": 12, "mesh.data": 8}, "not divisible by mesh.data=8"),
        ({"mesh.model": 4}, "mesh.model=4 is not possible"),
        ({"mesh.data": 8, "mesh.model": 2}, "needs 16 devices but 8 are visible"),
        ({"model.variant": "vgg"}, "model.variant='vgg' is unknown"),
        ({"optimizer.schedule": "cosine"}, "optimizer.schedule='cosine'"),
        ({"model.dtype": "float16"}, "model.dtype='float16' is unknown"),
    ],
)
def test_bad_config_is_refused_before_compiling(tiny, overrides, message, tmp_path):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.train_and_evaluate(tiny(**overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_wrong_num_classes_for_the_data(tiny, tmp_path):
    with pytest.raises(UsageError, match="has 10 classes but model.num_classes=7"):
        train.train_and_evaluate(tiny(**{"model.num_classes": 7}), str(tmp_path))


def test_mesh_checks_per_process():
    # 2 processes x 3 devices, mesh (3, 2): 9 splits over the data axis but not per process.
    with pytest.raises(UsageError, match="not divisible by the 2 processes"):
        parallel.check_mesh(-1, 2, 2, 9, num_devices=6, process_count=2)
    with pytest.raises(UsageError, match="must use all 8 devices of a multi-process run"):
        parallel.check_mesh(2, 2, 2, 8, num_devices=8, process_count=2)
    parallel.check_mesh(-1, 2, 2, 8, num_devices=8, process_count=2)  # fine: no exception


def test_a_diverging_run_stops_before_saving_a_nan_state(tiny, tmp_path):
    config = tiny(**{"optimizer.learning_rate": 1e6, "log_every_steps": 8})
    with pytest.raises(UsageError, match="loss became NaN or infinite by step 4"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))  # the NaN state was not saved
