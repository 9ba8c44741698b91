"""8 simulated CPU devices, strict rank promotion and a persistent compilation cache."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # before any device is touched
jax.config.update("jax_numpy_rank_promotion", "raise")
CACHE = Path(os.environ.get("ALEXNET_TEST_XLA_CACHE", Path.home() / ".cache/alexnet_jax/xla-tests"))
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = Path(__file__).resolve().parent.parent


def tiny_config(**overrides):
    """The digits demo shrunk to run in seconds: 1/8 width, 67x67 inputs, batch 16."""
    from configs import digits

    config = digits.get_config()
    config.batch_size = 16
    config.num_train_steps = 8
    config.log_every_steps = 4
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    config.model.width = 0.125
    config.input.image_size = 67
    config.input.resize_size = 72
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(scope="session")
def repo():
    return REPO
