"""Checkpoint round trip, the newest of several restored, refusal of a checkpoint this run
cannot resume (another model, an earlier state layout), damaged files, moves between meshes."""

import json
import shutil

import jax
import numpy as np
import optax
import pytest

from alexnet_jax import (
    UsageError,
    checkpoint,
    evaluation,
    load_checkpoint,
    parallel,
    steps,
    train,
    transforms,
)


def _states_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_round_trip(tiny, tmp_path):
    config = tiny()
    trainer = steps.Trainer(config, parallel.create_mesh(1, 1))
    saved = trainer.init_state(0)
    other = trainer.init_state(1)
    assert not _states_equal(saved, other)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(3, saved, config, {"class_names": ["a"], "stats": {}})
    ckpt.close()
    restored = checkpoint.Checkpointer(str(tmp_path)).restore(trainer.abstract_state)
    assert _states_equal(restored, saved)
    assert not _states_equal(restored, other)


def test_the_newest_of_several_checkpoints_is_restored(tiny, tmp_path):
    config = tiny()
    trainer = steps.Trainer(config, parallel.create_mesh(1, 1))
    states = {step: trainer.init_state(seed) for step, seed in ((2, 0), (6, 1), (4, 2))}
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    for step, state in states.items():  # saved out of order: the newest is the highest step
        ckpt.save(step, state, config, {"class_names": [], "stats": {}})
    ckpt.close()
    reader = checkpoint.Checkpointer(str(tmp_path))
    assert reader.latest_step() == 6
    restored = reader.restore(trainer.abstract_state)
    assert _states_equal(restored, states[6])
    assert not _states_equal(restored, states[4]) and not _states_equal(restored, states[2])


def _saved_at_step_4(config, workdir, state=None, mean_image_too=True):
    """A fresh state of `config` (or `state`) checkpointed at step 4, with a random mean image
    (as input.mean='image' runs save); returns the trainer."""
    trainer = steps.Trainer(config, parallel.create_mesh(1, 1))
    ckpt = checkpoint.Checkpointer(str(workdir))
    state = trainer.init_state(0) if state is None else state
    stats = transforms.IMAGENET_STATS.to_dict()
    side = config.input.resize_size
    mean_image = np.random.default_rng(0).uniform(0, 255, (side, side, 3)).astype(np.float32)
    data = {"class_names": list("0123456789"), "stats": stats}
    ckpt.save(4, state, config, data, mean_image if mean_image_too else None)
    ckpt.close()
    return trainer


def _files(workdir):
    return sorted((p.name, p.stat().st_size) for p in (workdir / "checkpoints").rglob("*"))


def test_a_mismatched_checkpoint_is_refused_and_kept(tiny, tmp_path):
    _saved_at_step_4(tiny(), tmp_path)
    before = _files(tmp_path)
    wider = tiny(**{"model.width": 0.25})
    match = r"params/fc6/kernel: checkpoint \(32, 512\), this run \(64, 1024\)"
    with pytest.raises(UsageError, match=match):
        train.train_and_evaluate(wider, str(tmp_path))
    assert _files(tmp_path) == before


def test_a_resume_with_other_settings_is_refused_naming_them_unless_allowed(
    trained_on_4x2, tmp_path, caplog
):
    config, workdir = trained_on_4x2
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    before = _files(tmp_path)
    changed = config.copy_and_resolve_references()
    changed.batch_size, changed.optimizer.momentum = 32, 0.5
    changed.log_every_steps = 3  # free to change: not named in the refusal
    match = (
        r"trained to step 4 with other settings: batch_size 16 -> 32, optimizer.momentum "
        r"0.9 -> 0.5\. .*--allow_config_changes"
    )
    with pytest.raises(UsageError, match=match):
        train.train_and_evaluate(changed, str(tmp_path))
    assert _files(tmp_path) == before
    # Asked for: resumed (here only evaluated: step 4 is its last), the changes logged.
    metrics = train.train_and_evaluate(changed, str(tmp_path), allow_config_changes=True)
    assert metrics["eval/count"] == 360
    assert "changed settings: batch_size 16 -> 32, log_every_steps" in caplog.text


# Orbax's async reader leaves un-awaited coroutines behind when the data is garbage.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_config_is_refused_alike_by_training_eval_and_predict(trained_on_4x2, tmp_path):
    config, workdir = trained_on_4x2
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "4" / "config" / "metadata").write_text("")
    message = r"The checkpoint at step 4 in .* could not be read .*move .*4 out of"
    for use in (
        lambda: train.train_and_evaluate(config, str(tmp_path)),
        lambda: evaluation.evaluate_checkpoint(config, str(tmp_path)),
        lambda: load_checkpoint(str(tmp_path)),
    ):
        with pytest.raises(UsageError, match=message):
            use()
    assert (tmp_path / "checkpoints" / "4" / "config" / "metadata").exists()


def test_a_failed_save_stops_the_run_in_one_line_naming_the_newest_intact_step(
    tiny, tmp_path, monkeypatch
):
    import orbax.checkpoint as ocp

    save = ocp.CheckpointManager.save
    full = "RESOURCE_EXHAUSTED: Failed writing: No space left on device [os_error_code='28']"

    def disk_full_at_8(self, step, *args, **kwargs):
        if step == 8:
            raise ValueError(full)
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_at_8)
    match = (
        r"^Saving the checkpoint of step 8 in .*checkpoints failed: the disk holding it is "
        r"full \(check with `df -h .*`\)\. The run stopped\. The newest intact checkpoint is "
        r"step 4; .*run the same command to resume from it\.$"
    )
    config = tiny(num_train_steps=12)
    with pytest.raises(checkpoint.SaveFailed, match=match):
        train.train_and_evaluate(config, str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in lines) == 8  # stopped at the failed save, not trained on
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert (
        checkpoint.Checkpointer(str(tmp_path))
        .restore(steps.Trainer(config, parallel.create_mesh(1, 1)).abstract_state)
        .step
        == 4
    )


def _layout_1_state(trainer):
    """A train state as alexnet_jax wrote it before the learning rate was set by name: the
    optimizer was a chain whose second element held the rate as `step_size`."""
    state = jax.device_get(trainer.init_state(0))
    mask = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", p)
    old = optax.chain(
        optax.add_decayed_weights(5e-4, mask=mask),
        optax.inject_hyperparams(optax.scale)(step_size=-0.01),
        optax.trace(decay=0.9),
    )
    return state.replace(opt_state=old.init(state.params))


def test_a_checkpoint_of_an_earlier_state_layout_is_refused_but_its_parameters_load(tiny, tmp_path):
    config = tiny()
    trainer = steps.Trainer(config, parallel.create_mesh(1, 1))
    old = _layout_1_state(trainer)
    _saved_at_step_4(config, tmp_path, old, mean_image_too=False)
    data = tmp_path / "checkpoints" / "4" / "data" / "metadata"
    fields = json.loads(data.read_text())
    del fields["state_layout"]  # what the earlier version wrote
    data.write_text(json.dumps(fields))
    saved_config = tmp_path / "checkpoints" / "4" / "config" / "metadata"
    fields = json.loads(saved_config.read_text())
    del fields["input"]["mean"], fields["input"]["normalize_on_device"]  # nor these fields
    saved_config.write_text(json.dumps(fields))
    before = _files(tmp_path)

    with pytest.raises(UsageError, match="predates a change of the train state's layout") as e:
        train.train_and_evaluate(config, str(tmp_path))
    assert "learning rate became a hyperparameter set by name" in str(e.value)
    assert "layout 1" in str(e.value) and "Nothing was changed" in str(e.value)
    assert _files(tmp_path) == before

    restored = load_checkpoint(str(tmp_path))
    assert restored.step == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), old.params)
    assert restored.preprocess.mean == "channel" and not restored.preprocess.on_device


def test_a_current_checkpoint_is_stamped_with_its_layout(tiny, tmp_path):
    config = tiny()
    trainer = _saved_at_step_4(config, tmp_path)
    path = tmp_path / "checkpoints" / "4" / "data" / "metadata"
    data = json.loads(path.read_text())
    assert data["state_layout"] == checkpoint.STATE_LAYOUT == 2
    checkpoint.Checkpointer(str(tmp_path)).check_compatible(trainer.abstract_state)  # resumable
    path.write_text(json.dumps({**data, "state_layout": 3}))  # as a later version might
    with pytest.raises(UsageError, match="was written by a newer version of alexnet_jax"):
        checkpoint.Checkpointer(str(tmp_path)).check_compatible(trainer.abstract_state)


@pytest.mark.parametrize("mesh", [(8, 1), (2, 1), (1, 1)])
def test_a_checkpoint_moves_between_meshes_and_training_continues(trained_on_4x2, mesh, tmp_path):
    config, workdir = trained_on_4x2
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    moved = config.copy_and_resolve_references()
    moved.mesh.data, moved.mesh.model = mesh
    moved.num_train_steps = 6
    metrics = train.train_and_evaluate(moved, str(tmp_path))
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 6
    assert metrics["eval/count"] == 360


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
        checkpoint.Checkpointer(str(tmp_path), read_only=True).read(4, _one_device())
    assert "step 4" in str(e.value) and "move" in str(e.value)
    with pytest.raises(UsageError, match="No intact checkpoint is left in") as e:
        checkpoint.Checkpointer(str(tmp_path)).restore(trainer.abstract_state)
    aside = tmp_path / "checkpoints" / "damaged_step_4"
    assert str(aside) in str(e.value)
    moved = [aside / p.relative_to(state_dir.parent) for p in data]
    assert all(p.exists() for p in moved)  # set aside, nothing deleted
    import gc

    gc.collect()  # collect Orbax's abandoned reads here, under this test's warning filter


def test_the_mean_image_travels_with_the_checkpoint(tiny, tmp_path):
    config = tiny()
    assert config.input.mean == "image"
    _saved_at_step_4(config, tmp_path)
    side = config.input.resize_size
    want = np.random.default_rng(0).uniform(0, 255, (side, side, 3)).astype(np.float32)
    restored = load_checkpoint(str(tmp_path))
    assert restored.preprocess.mean == "image"
    np.testing.assert_array_equal(restored.preprocess.stats.mean_image, want)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = checkpoint.Checkpointer(str(tmp_path), read_only=True).read(4, one)
    np.testing.assert_array_equal(saved.mean_image, want)


def _one_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _damage(checkpoints):
    """Step 8's arrays replaced by step 4's files: valid files that Orbax reads without a
    word, holding other values than the ones step 8 saved (as a sync or a restore from a
    backup that mixed two checkpoints would leave them)."""
    shutil.rmtree(checkpoints / "8" / "state")
    shutil.copytree(checkpoints / "4" / "state", checkpoints / "8" / "state")


@pytest.mark.slow  # two short runs
def test_a_damaged_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_one_before(
    tiny, tmp_path, capsys
):
    from alexnet_jax import checksums, evaluation, train

    config = tiny(num_train_steps=8, checkpoint_every_steps=4)
    train.train_and_evaluate(config, str(tmp_path))
    ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
    saved = ckpt.data(8)["checksums"]
    read = ckpt.read(8, _one_device())
    # Every array of the state, and the mean image, has its checksum.
    assert set(saved) == set(checksums.checksums(read.state)) | {"mean_image"}
    ckpt.close()

    _damage(tmp_path / "checkpoints")
    damaged = r"The checkpoint at step 8 in .* is damaged: .* from the checksums saved with"
    with pytest.raises(UsageError, match=damaged + r".* Read another step \(the directory holds"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(UsageError, match=damaged):
        evaluation.evaluate_checkpoint(config, str(tmp_path))
    assert load_checkpoint(str(tmp_path), step=4).step == 4  # the one before is intact

    longer = tiny(num_train_steps=12, checkpoint_every_steps=4)
    metrics = train.train_and_evaluate(longer, str(tmp_path))
    assert np.isfinite(metrics["eval/loss"])
    assert "is damaged" in capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["12", "4", "8", "damaged_step_8"]  # kept aside, never deleted
    assert load_checkpoint(str(tmp_path)).step == 12

    # 4 KB overwritten in the middle of step 12's largest array file: refused either way
    # (the file no longer decodes, or decodes to other values than its checksums).
    files = list((tmp_path / "checkpoints" / "12" / "state" / "ocdbt.process_0" / "d").iterdir())
    biggest = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(0).bytes(4096)
    biggest.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"step 12 in .* (is damaged|could not be read)"):
        load_checkpoint(str(tmp_path))
