"""uint8 batches normalised on the device equal the host's float32 path: crops, mirrors and
lighting, the mean image's window under each crop, eval's centre and ten patches, the step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import (
    device_input,
    input_pipeline,
    input_stats,
    parallel,
    sources,
    steps,
    transforms,
)


def _setup(tiny, **overrides):
    config = tiny(**{"input.random_flip": True, "input.pca_lighting_std": 0.1, **overrides})
    source = sources.create_source(config.input)
    stats = input_stats.get_stats(source, config.input.resize_size, 500, None)
    return config, source, transforms.Preprocess.from_config(config.input, stats)


def _train_batch(config, source, p, on_device, step=0):
    batches = input_pipeline.train_batches(
        source,
        dataclasses.replace(p, on_device=on_device),
        seed=1,
        batch_size=config.batch_size,
        start_step=step,
        num_steps=step + 1,
    )
    return next(batches)


def _eval_batch(config, source, p, on_device, ten_crop):
    q = dataclasses.replace(p, on_device=on_device, ten_crop=ten_crop)
    return next(input_pipeline.eval_batches(source, q, batch_size=config.batch_size))


def _on_device(batch, p, mesh):
    """Normalise a host batch of uint8 crops as the steps do, on `mesh`."""
    glob = parallel.global_batch(mesh, batch, batch.size)
    consts = transforms.device_constants(p)
    return np.asarray(jax.jit(parallel.batch_fn(device_input.normalize, mesh))(glob, consts))


@pytest.mark.parametrize("mean, divide", [("image", False), ("image", True), ("channel", False)])
def test_train_crops_normalised_on_the_device_equal_the_host_path(tiny, mean, divide):
    config, source, p = _setup(tiny, **{"input.mean": mean, "input.divide_by_std": divide})
    host = _train_batch(config, source, p, on_device=False)
    raw = _train_batch(config, source, p, on_device=True)
    # The batch varies in every way the device must follow.
    assert raw.images.dtype == np.uint8 and host.images.dtype == np.float32
    assert raw.images.nbytes * 4 == host.images.nbytes
    crops = raw.crops
    assert len(set(crops[:, 0])) > 2 and len(set(crops[:, 1])) > 2
    assert 0 < crops[:, 2].sum() < len(crops)  # some mirrored, some not
    assert np.all(np.abs(raw.shifts) > 0) and np.ptp(raw.shifts, 0).min() > 0.1
    mesh = parallel.create_mesh(2, 2)
    out = _on_device(raw, p, mesh)
    np.testing.assert_allclose(out, host.images, rtol=1e-5, atol=1e-4)
    if mean == "image":
        image = p.stats.mean_image
        assert np.ptp(image) > 50  # a real mean image, not a constant
        # The window and its mirror matter: without them the result is far off.
        unmirrored = _on_device(raw._replace(crops=crops * [1, 1, 0]), p, mesh)
        assert np.abs(unmirrored - host.images).max() > 1.0 / (63.0 if divide else 1.0)
        channel = dataclasses.replace(p, mean="channel")
        assert np.abs(_on_device(raw, channel, mesh) - host.images).max() > 1.0


@pytest.mark.parametrize("ten_crop", [False, True])
def test_eval_crops_normalised_on_the_device_equal_the_host_path(tiny, ten_crop):
    config, source, p = _setup(tiny, **{"input.divide_by_std": True})
    host = _eval_batch(config, source, p, False, ten_crop)
    raw = _eval_batch(config, source, p, True, ten_crop)
    assert raw.images.dtype == np.uint8 and raw.shifts is None
    assert raw.crops.shape == ((config.batch_size, 10, 3) if ten_crop else (16, 3))
    out = _on_device(raw, p, parallel.create_mesh(4, 1))
    assert np.ptp(out) > 1.0
    np.testing.assert_allclose(out, host.images, rtol=1e-5, atol=1e-4)


def test_the_step_on_uint8_batches_equals_the_step_on_float_batches(tiny):
    """Two steps on mesh (2, 2) fed uint8 crops end where two steps on one device fed the host's
    float32 images do; the eval sums agree too."""
    config, source, p = _setup(tiny, **{"mesh.data": 2, "mesh.model": 2})
    results = []
    for mesh_shape, on_device in (((1, 1), False), ((2, 2), True)):
        mesh = parallel.create_mesh(*mesh_shape)
        trainer = steps.Trainer(config, mesh)
        q = dataclasses.replace(p, on_device=on_device)
        consts = trainer.input_constants(transforms.device_constants(q))
        assert (consts is not None) == on_device
        state = trainer.init_state(0)
        for step in range(2):
            local = _train_batch(config, source, p, on_device, step)
            batch = parallel.global_batch(mesh, local, config.batch_size)
            state, sums = trainer.train_step(state, batch, None, consts)
        local = _eval_batch(config, source, p, on_device, ten_crop=True)
        batch = parallel.global_batch(mesh, local, config.batch_size)
        evals = trainer.eval_steps[True](state.params, batch, consts)
        results.append(jax.device_get((state.params, sums["loss"], evals)))
    (ref, ref_loss, ref_eval), (got, loss, evals) = results
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-4)
    for k in ("loss", "count"):
        assert float(evals[k]) == pytest.approx(float(ref_eval[k]), rel=1e-4)
    init = jax.device_get(steps.Trainer(config, parallel.create_mesh(1, 1)).init_state(0).params)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ref, init)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the steps changed the parameters
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), got, ref)


def test_a_uint8_batch_without_its_statistics_is_refused(tiny):
    config, source, p = _setup(tiny)
    mesh = parallel.create_mesh(1, 1)
    trainer = steps.Trainer(config, mesh)
    batch = parallel.global_batch(mesh, _train_batch(config, source, p, True), config.batch_size)
    with pytest.raises(ValueError, match="needs the constants that normalise it"):
        trainer.train_step(trainer.init_state(0), batch)
