"""python -m alexnet_jax.predict: image files classified with a run's own eval preprocessing,
each file answered in order, the bad ones named."""

import json

import numpy as np
import pytest

from alexnet_jax import UsageError, load_checkpoint, sources


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
