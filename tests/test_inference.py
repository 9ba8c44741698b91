"""load_checkpoint on one device, whatever mesh trained the run; predict equals the run's eval."""

import json

import numpy as np
import pytest

from alexnet_jax import UsageError, load_checkpoint, sources


def test_load_checkpoint_on_one_device(trained_on_4x2):
    config, workdir = trained_on_4x2
    r = load_checkpoint(str(workdir))
    assert r.step == 4 and r.class_names == [str(d) for d in range(10)]
    kernel = r.params["conv2"]["kernel"]
    assert kernel.shape[-1] == 2 * 8 * 2  # both towers, whole again
    assert len(kernel.sharding.device_set) == 1
    assert r.config.mesh.model == 2 and not r.preprocess.ten_crop
    grey = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 1)).astype(np.uint8)
    digits = np.repeat(grey, 3, axis=-1)
    probs = r.predict(digits)
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(r.predict(digits[0]), probs[:1], rtol=1e-5)  # one HWC image
    np.testing.assert_allclose(r.predict(grey), probs, rtol=1e-5)  # one channel


def test_predict_on_the_held_out_digits_gives_the_runs_eval(trained_on_4x2):
    """The run's sharded eval on mesh (4, 2) and predict on one device agree on every digit."""
    config, workdir = trained_on_4x2
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in lines if "eval/loss" in m][-1]
    held_out = sources.digits_source().eval
    pairs = [held_out.decode(key) for key in held_out.epoch(0, 0, 0)]
    images = np.stack([image.numpy() for image, _ in pairs])
    labels = np.array([int(label) for _, label in pairs])
    probs = load_checkpoint(str(workdir)).predict(images)
    assert 0 < final["eval/top1_error"] < 1  # neither all right nor all wrong: it can differ
    assert np.mean(probs.argmax(-1) != labels) == pytest.approx(final["eval/top1_error"])
    nll = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert nll == pytest.approx(final["eval/loss"], rel=1e-4)


def test_load_checkpoint_without_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoints"):
        load_checkpoint(str(tmp_path))


def test_predict_refuses_float_images_and_a_missing_step_is_listed(trained_on_4x2):
    _, workdir = trained_on_4x2
    run = load_checkpoint(str(workdir))
    with pytest.raises(UsageError, match=r"uint8 images \(0-255\), got float32.*\* 255"):
        run.predict(np.full((1, 8, 8, 3), 0.5, np.float32))
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at step 3 .* holds steps \[4\]"):
        load_checkpoint(str(workdir), step=3)


def test_predict_refuses_to_answer_with_non_finite_probabilities(trained_on_4x2):
    import dataclasses

    _, workdir = trained_on_4x2
    run = load_checkpoint(str(workdir))
    images = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3)).astype(np.uint8)
    assert np.all(np.isfinite(run.predict(images)))
    params = {**run.params, "fc8": {**run.params["fc8"]}}
    params["fc8"]["bias"] = run.params["fc8"]["bias"] * np.nan  # as a diverged run leaves it
    diverged = dataclasses.replace(run, params=params)
    with pytest.raises(UsageError, match="The parameters of step 4 give non-finite outputs"):
        diverged.predict(images)
