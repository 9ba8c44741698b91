"""The tower-sharded step equals a plain single-device step on every mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import parallel, train

MESHES = [(4, 2), (2, 2), (8, 1), (1, 1)]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _reference_step(config, params, images, labels, masks):
    """No mesh, no shard_map: the whole model on one device, optax's cross-entropy."""
    model = train.build_model(config)

    def loss_fn(p):
        logits = model.apply({"params": p}, images, train=True, dropout_masks=masks or None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    tx = train.make_optimizer(config.optimizer)
    opt_state = train._set_learning_rate(tx.init(params), jnp.float32(0.01))
    # Two updates, so the momentum term takes part in the comparison.
    updates, opt_state = tx.update(grads, opt_state, params)
    updates2, _ = tx.update(grads, opt_state, optax.apply_updates(params, updates))
    return loss, grads, updates2


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
    ref_trainer = train.Trainer(base, ref_mesh)
    params = jax.device_get(ref_trainer.init_state(0).params)
    masks = parallel.dropout_masks(jax.random.PRNGKey(3), ref_trainer.model, 8, 67, ref_mesh)
    masks = tuple(np.asarray(m) for m in masks)
    want_loss, want_grads, want_updates = _reference_step(base, params, images, labels, masks)

    for data, model in MESHES:
        config = base.copy_and_resolve_references()
        config.mesh.data, config.mesh.model = data, model
        trainer = train.Trainer(config, parallel.create_mesh(data, model))
        fc8_split = parallel.tower_model(trainer.model, trainer.mesh).fc8_shards > 1
        assert fc8_split == (model == 2 and classes % 2 == 0)
        state = trainer.init_state(0)
        batch = parallel.global_batch(trainer.mesh, {"images": images, "labels": labels})
        drawn = parallel.dropout_masks(jax.random.PRNGKey(3), trainer.model, 8, 67, trainer.mesh)
        for a, b in zip(drawn, masks, strict=True):  # masks: the same on every mesh
            np.testing.assert_array_equal(a, b)
        grad_fn = jax.jit(jax.value_and_grad(trainer.loss_fn, has_aux=True))
        (loss, _), grads = grad_fn(state.params, batch["images"], batch["labels"], drawn)
        opt_state = train._set_learning_rate(state.opt_state, jnp.float32(0.01))
        updates, opt_state = trainer.tx.update(grads, opt_state, state.params)
        moved = optax.apply_updates(state.params, updates)
        updates2, _ = trainer.tx.update(grads, opt_state, moved)

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
    trainer = train.Trainer(config, parallel.create_mesh(*mesh))
    state = trainer.init_state(0)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 10, 67, 67, 3)).astype(np.float32)
    labels = np.array([0, 3, 5, 9], np.int32)
    weights = np.array([1, 1, 1, 0], np.float32)  # the last row is padding
    batch = parallel.global_batch(
        trainer.mesh, {"images": images, "labels": labels, "weights": weights}
    )
    sums = jax.device_get(trainer.eval_step(state.params, *batch.values()))

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
