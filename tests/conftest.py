"""8 simulated CPU devices, strict rank promotion, a persistent compilation cache, and the one
tiny configuration the tests train with."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

from alexnet_jax import backend  # noqa: E402

# The XLA flags launch.py runs with, before any backend starts.
backend.prepare_backend()

jax.config.update("jax_num_cpu_devices", 8)  # before any device is touched
jax.config.update("jax_numpy_rank_promotion", "raise")
CACHE = Path(os.environ.get("ALEXNET_TEST_XLA_CACHE", Path.home() / ".cache/alexnet_jax/xla-tests"))
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = Path(__file__).resolve().parent.parent

# The digits demo shrunk to run in seconds: 1/8 width, 67x67 inputs, batch 16, 8 steps.
TINY = {
    "batch_size": 16,
    "optimizer.base_batch_size": 16,  # learning_rate is the rate used (no linear scaling)
    "num_train_steps": 8,
    "log_every_steps": 4,
    "eval_every_steps": 4,
    "checkpoint_every_steps": 4,
    "model.width": 0.125,
    "input.image_size": 67,
    "input.resize_size": 72,
}


def tiny_config(**overrides):
    """configs/digits.py with TINY and then `overrides` ({'model.width': 0.25, ...}) applied."""
    from configs import digits

    config = digits.get_config()
    if "batch_size" in overrides:  # keep the rate: tests that change the batch mean that
        overrides = {"optimizer.base_batch_size": overrides["batch_size"], **overrides}
    for key, value in {**TINY, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_flags(**overrides) -> list[str]:
    """The same as launch.py flags: --config.KEY=VALUE for TINY and then `overrides`."""
    return [f"--config.{key}={value}" for key, value in {**TINY, **overrides}.items()]


def write_folder(root: Path, classes=("cat", "dog"), per_class=3, bad=None) -> None:
    """root/{train,validation}/<class>/<i>.png; class k's images are filled with 40 k + i, so
    each pixel tells its label. `bad`: a file name in train/<first class> that is no image."""
    import numpy as np
    import tensorflow as tf

    for split in ("train", "validation"):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                img = np.full((20 + i, 30, 3), 40 * k + i, np.uint8)
                (d / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
    if bad:
        (root / "train" / classes[0] / bad).write_bytes(b"not an image at all")


@pytest.fixture(scope="session")
def trained_on_4x2(tmp_path_factory):
    """A 4-step tiny run on mesh (4, 2), one tower per device: (config, workdir). Read only."""
    from alexnet_jax import train

    workdir = tmp_path_factory.mktemp("mesh42")
    config = tiny_config(**{"mesh.data": 4, "mesh.model": 2, "num_train_steps": 4})
    train.train_and_evaluate(config, str(workdir))
    return config, workdir


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(scope="session")
def repo():
    return REPO
