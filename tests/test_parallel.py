"""The tower-sharded step equals a plain single-device step on every mesh; the mesh checks; the
per-example loss and ranks from class-sharded logits; the global dropout masks."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from alexnet_jax import UsageError, parallel, steps
from alexnet_jax.batch import Batch
from alexnet_jax.model import AlexNet
from alexnet_jax.optimizer import Optimizer, set_learning_rate

MESHES = [(4, 2), (2, 2), (8, 1), (1, 1)]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _reference_step(config, params, images, labels, masks):
    """No mesh, no shard_map: the whole model on one device, optax's cross-entropy."""
    model = AlexNet.from_config(config.model)

    def loss_fn(p):
        logits = model.apply({"params": p}, images, train=True, dropout_masks=masks or None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    tx = Optimizer.from_config(config.optimizer, config.batch_size).tx
    opt_state = set_learning_rate(tx.init(params), jnp.float32(0.01))
    return loss, grads, jax.jit(partial(_two_updates, tx))(grads, opt_state, params)


def _two_updates(tx, grads, opt_state, params):
    """The second of two updates with the same gradients, so momentum takes part."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return tx.update(grads, opt_state, optax.apply_updates(params, updates))[0]


@pytest.mark.parametrize(
    "dropout, classes",
    [(0.0, 10), (0.5, 10), (0.5, 7)],  # 7 classes: fc8 replicated instead of split over towers
)
def test_sharded_step_equals_single_device(tiny, dropout, classes):
    base = tiny(**{"model.dropout_rate": dropout, "model.num_classes": classes, "batch_size": 8})
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 67, 67, 3)).astype(np.float32)
    labels = rng.integers(0, classes, 8).astype(np.int32)
    ref_mesh = parallel.create_mesh(1, 1)
    ref_trainer = steps.Trainer(base, ref_mesh)
    params = jax.device_get(ref_trainer.init_state(0).params)
    masks = parallel.dropout_masks(jax.random.PRNGKey(3), ref_trainer.model, 8, 67, ref_mesh)
    masks = tuple(np.asarray(m) for m in masks)
    if dropout:  # two masks from two keys, each keeping about 1 - rate of the units
        assert not np.array_equal(masks[0], masks[1])
        assert all(abs(m.mean() - (1 - dropout)) < 0.1 for m in masks)
    want_loss, want_grads, want_updates = _reference_step(base, params, images, labels, masks)

    for data, model in MESHES:
        config = base.copy_and_resolve_references()
        config.mesh.data, config.mesh.model = data, model
        trainer = steps.Trainer(config, parallel.create_mesh(data, model))
        fc8_split = parallel.tower_model(trainer.model, trainer.mesh).fc8_shards > 1
        assert fc8_split == (model == 2 and classes % 2 == 0)
        state = trainer.init_state(0)
        batch = parallel.global_batch(trainer.mesh, Batch(images, labels), 8)
        drawn = parallel.dropout_masks(jax.random.PRNGKey(3), trainer.model, 8, 67, trainer.mesh)
        for a, b in zip(drawn, masks, strict=True):  # masks: the same on every mesh
            np.testing.assert_array_equal(a, b)
        grad_fn = jax.jit(jax.value_and_grad(trainer.loss_fn, has_aux=True))
        (loss, _), grads = grad_fn(state.params, batch.images, batch.labels, drawn)
        opt_state = set_learning_rate(state.opt_state, jnp.float32(0.01))
        updates2 = jax.jit(partial(_two_updates, trainer.optimizer.tx))(
            grads, opt_state, state.params
        )

        assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss)), (data, model)
        for name in params:
            for leaf in ("kernel", "bias"):
                g, u = grads[name][leaf], updates2[name][leaf]
                assert np.linalg.norm(np.asarray(u)) > 0  # the parameters do change
                assert rel(g, want_grads[name][leaf]) < 1e-5, (data, model, name, leaf)
                assert rel(u, want_updates[name][leaf]) < 1e-5, (data, model, name, leaf)


@pytest.mark.parametrize("mesh", [(1, 1), (2, 2)])
def test_ten_patch_eval_averages_the_softmax(tiny, mesh):
    config = tiny(**{"input.eval_ten_crop": True, "model.weight_init": "he", "batch_size": 4})
    config.mesh.data, config.mesh.model = mesh
    trainer = steps.Trainer(config, parallel.create_mesh(*mesh))
    state = trainer.init_state(0)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 10, 67, 67, 3)).astype(np.float32)
    labels = np.array([0, 3, 5, 9], np.int32)
    weights = np.array([1, 1, 1, 0], np.float32)  # the last row is padding
    batch = parallel.global_batch(trainer.mesh, Batch(images, labels, weights), 4)
    sums = jax.device_get(trainer.eval_step(state.params, batch))

    params = jax.device_get(state.params)
    logits = trainer.model.apply({"params": params}, images.reshape(40, 67, 67, 3))
    probs = np.asarray(jax.nn.softmax(logits)).reshape(4, 10, 10).mean(1)
    single = np.asarray(jax.nn.softmax(logits)).reshape(4, 10, 10)[:, 0]
    assert not np.allclose(probs, single)  # the crops disagree: averaging matters
    nll = -np.log(probs[np.arange(4), labels])
    assert sums["count"] == 3
    np.testing.assert_allclose(sums["loss"], nll[:3].sum(), rtol=1e-5)
    top1 = (probs.argmax(-1) != labels)[:3].sum()
    assert sums["top1_errors"] == top1


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


@pytest.mark.parametrize("mesh_model", [1, 2])
def test_the_sharded_sums_put_the_top5_boundary_after_the_5th_class(mesh_model):
    """Labels ranked exactly 5th (a top-5 hit) and 6th (an error), summed over a (data, model)
    mesh as evaluation sums them, with a padded row that counts for nothing."""
    ranks = np.array([0, 1, 4, 5, 4, 5, 9, 3])  # how many classes beat each label
    weights = np.array([1, 1, 1, 1, 1, 1, 0, 1], np.float32)
    labels = np.arange(8, dtype=np.int32)
    logits = np.zeros((8, 10), np.float32)
    for i, label in enumerate(labels):
        others = [c for c in range(10) if c != label]
        logits[i, others] = 10.0 - np.arange(9)  # 10, 9, ..., 2
        logits[i, label] = 10.5 - ranks[i]  # just below the ranks[i]-th of them
    split = mesh_model > 1
    mesh = parallel.create_mesh(8 // mesh_model, mesh_model)

    def local(lg, lb, w):
        return parallel._sums(*parallel.example_stats(lg, lb, split), w, 1)

    spec = P(parallel.DATA, parallel.MODEL) if split else P(parallel.DATA)
    f = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, P(parallel.DATA), P(parallel.DATA)), out_specs=P()
    )
    sums = jax.device_get(jax.jit(f)(logits, labels, weights))
    assert sums["count"] == 7
    assert sums["top1_errors"] == 6  # every weighted rank but 0
    assert sums["top5_errors"] == 2  # the two 6th places; the 5th places are hits


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


def test_mesh_checks_per_process():
    with pytest.raises(UsageError, match="must use all 8 devices of a multi-process run"):
        parallel.check_mesh(2, 2, 2, 8, num_devices=8, process_count=2)
    parallel.check_mesh(-1, 2, 2, 8, num_devices=8, process_count=2)  # fine: no exception
    parallel.check_mesh(-1, 2, 2, 9, num_devices=6, process_count=2)  # rows overlap: fine too


def test_each_device_set_reads_the_rows_its_devices_hold():
    mesh = parallel.create_mesh(2, 2)  # [[d0, d1], [d2, d3]]: a tower pair per row
    d = mesh.devices
    rows = lambda *devs: parallel.process_rows(mesh, 8, devs).tolist()
    # Pairs not split (they do not span processes here): a device reads its pair's rows.
    assert rows(d[0, 0]) == rows(d[0, 1]) == [0, 1, 2, 3]
    assert rows(d[1, 0]) == rows(d[1, 1]) == [4, 5, 6, 7]
    assert rows(d[0, 0], d[0, 1]) == [0, 1, 2, 3]  # a process per pair
    assert rows(d[0, 0], d[1, 1]) == list(range(8))
    assert parallel.process_rows(mesh, 8).tolist() == list(range(8))  # this process: all
    # (3, 2) over two processes of three devices: the middle pair is split, so both read it.
    mesh = parallel.create_mesh(3, 2)
    first, second = mesh.devices.flat[:3], mesh.devices.flat[3:6]
    assert parallel.process_rows(mesh, 9, first).tolist() == list(range(6))
    assert parallel.process_rows(mesh, 9, second).tolist() == list(range(3, 9))


def test_a_tower_pair_split_over_processes_reads_each_row_once():
    """One process per device and mesh.model = 2: each device of a pair reads (and decodes)
    half of the pair's rows, and global_batch joins the halves into the same global batch."""
    mesh = parallel.create_mesh(2, 2)
    d = mesh.devices
    half = lambda dev: parallel.process_rows(mesh, 8, [dev], split=True).tolist()
    assert [half(d[0, 0]), half(d[0, 1]), half(d[1, 0]), half(d[1, 1])] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]
    whole = lambda dev: parallel.process_rows(mesh, 8, [dev], split=False).tolist()
    assert whole(d[0, 0]) == whole(d[0, 1]) == half(d[0, 0]) + half(d[0, 1])
    assert not parallel.split_pairs(mesh, 8)  # one process: its pairs span no processes

    local = {"images": np.arange(8 * 3, dtype=np.uint8).reshape(8, 3), "labels": np.arange(8)}
    plain = parallel.global_batch(mesh, local, 8)
    parallel._input.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(parallel, "split_pairs", lambda mesh, batch: True)
            joined = parallel.global_batch(mesh, local, 8)
    finally:
        parallel._input.cache_clear()
    for k in local:
        assert joined[k].sharding == plain[k].sharding == parallel.batch_sharded(mesh)
        np.testing.assert_array_equal(joined[k], plain[k])
        for shard in joined[k].addressable_shards:  # every device holds its pair's rows
            np.testing.assert_array_equal(shard.data, local[k][shard.index])


def test_a_batch_of_the_wrong_size_is_refused():
    mesh = parallel.create_mesh(4, 2)
    with pytest.raises(ValueError, match="holds 4 rows of the batch, not 8"):
        parallel.global_batch(mesh, {"labels": np.zeros(4, np.int32)}, 8)


@pytest.mark.parametrize("classes, fc8_split", [(10, True), (7, False)])
def test_param_specs_split_every_layer_over_the_towers(classes, fc8_split):
    model = AlexNet(num_classes=classes, width=0.125)
    params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 67, 67, 3)))["params"]
    )
    specs = parallel.param_specs(model, params, parallel.create_mesh(1, 2))
    for name, layer in specs.items():
        split = name != "fc8" or fc8_split
        for leaf, spec in layer.items():
            want = P(*[None] * (params[name][leaf].ndim - 1), "model") if split else P()
            assert spec == want, (name, leaf)
    one = parallel.param_specs(model, params, parallel.create_mesh(2, 1))
    assert all(s == P() for s in jax.tree.leaves(one, is_leaf=lambda x: isinstance(x, P)))
