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


def _digit_files(tmp_path):
    """Three held-out digits as files: a colour PNG, a greyscale JPEG and a larger PNG."""
    import tensorflow as tf

    held_out = sources.digits_source().eval
    images = [held_out.decode(k)[0].numpy() for k in list(held_out.epoch(0, 0, 0))[:3]]
    paths = [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"]
    paths[0].write_bytes(tf.io.encode_png(images[0]).numpy())
    paths[1].write_bytes(tf.io.encode_jpeg(images[1][..., :1], quality=100).numpy())
    big = tf.image.resize(images[2], (40, 40), "nearest").numpy().astype(np.uint8)
    paths[2].write_bytes(tf.io.encode_png(big).numpy())
    return images, paths


def test_predict_classifies_files_and_names_the_bad_ones(trained_on_4x2, tmp_path):
    from alexnet_jax import predict

    _, workdir = trained_on_4x2
    images, paths = _digit_files(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    asked = [str(paths[0]), str(tmp_path / "missing.jpg"), str(tmp_path / "notes.txt")]
    asked += [str(p) for p in paths[1:]]
    results = predict.classify(str(workdir), asked, top=5)
    assert [r["image"] for r in results] == asked  # every file answered, in order
    assert results[1]["error"] == "no such file"
    assert results[2]["error"].startswith("not a readable image")
    good = [r for r in results if "top" in r]
    assert len(good) == 3 and all(len(r["top"]) == 5 for r in good)
    run = load_checkpoint(str(workdir))
    want = run.predict(images[0])[0]
    top = good[0]["top"]
    assert (
        top[0]["index"] == int(want.argmax())
        and top[0]["class"] == run.class_names[top[0]["index"]]
    )
    assert top[0]["probability"] == pytest.approx(float(want.max()), rel=1e-5)
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    for bad in (0, -1):  # -1 listed 9 of 10 classes, 0 none
        with pytest.raises(UsageError, match=f"--top={bad}: list at least 1 class"):
            predict.classify(str(workdir), asked, top=bad)


@pytest.mark.slow  # a subprocess
def test_the_predict_command(trained_on_4x2, tmp_path):
    import subprocess
    import sys

    _, workdir = trained_on_4x2
    _, paths = _digit_files(tmp_path)
    cmd = [sys.executable, "-m", "alexnet_jax.predict", f"--workdir={workdir}", "--json"]
    r = subprocess.run(
        [*cmd, str(paths[0]), str(tmp_path / "missing.png")], capture_output=True, text=True
    )
    assert r.returncode == 1  # one file was missing
    assert f"predict: {tmp_path / 'missing.png'}: no such file" in r.stderr
    assert "orbax" not in r.stderr  # the line about the file is not buried in Orbax's logs
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2 and len(lines[0]["top"]) == 5 and "error" in lines[1]
    r = subprocess.run([*cmd[:-1], str(paths[1])], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"{paths[1]}:\n")


def test_the_kernel_grid_puts_each_tower_in_its_own_block():
    from alexnet_jax.figures import kernel_grid

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(11, 11, 3, 8)).astype(np.float32)
    kernel[..., 4:] = np.abs(kernel[..., 4:])  # tower 2's kernels differ from tower 1's
    kernel[:, :, 1:, 4:] = 0.0  # and are red only
    grid = kernel_grid({"conv1": {"kernel": kernel}}, towers=2, scale=2)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    top, bottom = grid[: grid.shape[0] // 2], grid[grid.shape[0] // 2 :]
    # Tower 1's block holds colour in every channel; tower 2's only red, its G and B at 0
    # wherever a kernel is drawn (white ground elsewhere).
    drawn = bottom[..., 0] < 255
    assert drawn.any() and np.all(bottom[..., 1][drawn] == 0)
    assert (top[..., 1] < 255).any() and (top[..., 1] > 0).any()
    # Each kernel is stretched to the full range on its own.
    assert grid.min() == 0 and grid[grid < 255].max() > 200
