"""Checkpoint round trip, refusal of a mismatched workdir, load_checkpoint across meshes."""

import jax
import numpy as np
import pytest

from alexnet_jax import UsageError, checkpoint, load_checkpoint, parallel, train


def _states_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_round_trip(tiny, tmp_path):
    config = tiny()
    trainer = train.Trainer(config, parallel.create_mesh(1, 1))
    saved = trainer.init_state(0)
    other = trainer.init_state(1)
    assert not _states_equal(saved, other)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(3, saved, config, {"class_names": ["a"], "stats": {}})
    ckpt.close()
    restored = checkpoint.Checkpointer(str(tmp_path)).restore(trainer.abstract_state)
    assert _states_equal(restored, saved)
    assert not _states_equal(restored, other)


def _saved_at_step_4(config, workdir):
    """A fresh state of `config` checkpointed at step 4 in workdir; returns the trainer."""
    trainer = train.Trainer(config, parallel.create_mesh(1, 1))
    ckpt = checkpoint.Checkpointer(str(workdir))
    ckpt.save(4, trainer.init_state(0), config, {"class_names": [], "stats": {}})
    ckpt.close()
    return trainer


def test_a_mismatched_checkpoint_is_refused_and_kept(tiny, tmp_path):
    _saved_at_step_4(tiny(), tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").rglob("*"))
    wider = tiny(**{"model.width": 0.25})
    match = r"params/fc6/kernel: checkpoint \(32, 512\), this run \(64, 1024\)"
    with pytest.raises(UsageError, match=match):
        train.train_and_evaluate(wider, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").rglob("*")) == before


@pytest.fixture(scope="module")
def trained_on_4x2(tmp_path_factory):
    """A short run on mesh (4, 2): one tower per device."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("mesh42")
    config = tiny_config(**{"mesh.data": 4, "mesh.model": 2, "num_train_steps": 4})
    train.train_and_evaluate(config, str(workdir))
    return config, workdir


def test_load_checkpoint_on_one_device(trained_on_4x2):
    config, workdir = trained_on_4x2
    r = load_checkpoint(str(workdir))
    assert r.step == 4 and r.class_names == [str(d) for d in range(10)]
    kernel = r.params["conv2"]["kernel"]
    assert kernel.shape[-1] == 2 * 8 * 2  # both towers, whole again
    assert len(kernel.sharding.device_set) == 1
    digits = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3)).astype(np.uint8)
    probs = r.predict(digits)
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert r.predict(digits[0]).shape == (1, 10)  # a single HWC image too


@pytest.mark.parametrize("mesh", [(8, 1), (2, 1), (1, 1)])
def test_a_checkpoint_moves_between_meshes_and_training_continues(trained_on_4x2, mesh, tmp_path):
    import shutil

    config, workdir = trained_on_4x2
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    moved = config.copy_and_resolve_references()
    moved.mesh.data, moved.mesh.model = mesh
    moved.num_train_steps = 6
    metrics = train.train_and_evaluate(moved, str(tmp_path))
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 6
    assert metrics["eval/count"] == 360


def test_load_checkpoint_without_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoints"):
        load_checkpoint(str(tmp_path))


# Orbax's async reader leaves un-awaited coroutines behind when the data is garbage.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_corrupt_checkpoint_is_named_and_kept(tiny, tmp_path):
    trainer = _saved_at_step_4(tiny(), tmp_path)
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    data = [p for p in (state_dir / "ocdbt.process_0" / "d").iterdir() if p.stat().st_size > 1e5]
    assert data
    for p in data:
        p.write_bytes(b"\0" * 100)  # truncated, garbled array data
    with pytest.raises(UsageError, match="could not be read") as e:
        checkpoint.Checkpointer(str(tmp_path)).restore(trainer.abstract_state)
    assert "step 4" in str(e.value) and "move" in str(e.value)
    assert all(p.exists() for p in data)  # nothing deleted
    import gc

    gc.collect()  # collect Orbax's abandoned reads here, under this test's warning filter
