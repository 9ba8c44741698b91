"""config_checks.py: the config errors seen before compiling, each one line naming the fix; the
global batch from per_device_batch_size. (tests/test_train.py runs each refusal through a run,
which must write nothing.)"""

import sys

import pytest
from conftest import tiny_config

from alexnet_jax import UsageError, config_checks


def test_per_device_batch_size_sets_the_global_batch(tiny):
    config = tiny(**{"mesh.model": 2, "batch_size": 8})
    assert config_checks.resolve_batch_size(config, 8) is config  # unset: batch_size as given
    config.per_device_batch_size = 3
    resolved = config_checks.resolve_batch_size(config, 8)  # mesh (4, 2): 4 data shards
    assert (resolved.batch_size, config.batch_size) == (12, 8)
    config.per_device_batch_size = 0
    with pytest.raises(UsageError, match="per_device_batch_size=0 must be positive"):
        config_checks.resolve_batch_size(config, 8)


def test_the_loader_is_checked_before_anything_runs(monkeypatch):
    config = tiny_config(**{"input.loader": "dali"})
    config_checks.check_config(config, 8, 1)  # installed here
    with pytest.raises(UsageError, match="unknown"):
        config_checks.check_config(tiny_config(**{"input.loader": "pillow"}), 8, 1)
    off = tiny_config(**{"input.loader": "dali", "input.normalize_on_device": False})
    with pytest.raises(UsageError, match="normalize_on_device=True"):
        config_checks.check_config(off, 8, 1)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed
    with pytest.raises(UsageError, match=r'pip install -e "\.\[dali\]"') as e:
        config_checks.check_config(config, 8, 1)
    assert len(str(e.value).splitlines()) == 1


def test_the_profile_window_is_read_or_refused():
    assert config_checks.profile_window(tiny_config()) is None
    assert config_checks.profile_window(tiny_config(profile_steps="10,15")) == (10, 15)
    for bad in ("5", "4,2", "0,3", "a,b"):
        with pytest.raises(UsageError, match="give 'N,M' with 0 < N < M"):
            config_checks.profile_window(tiny_config(profile_steps=bad))
