"""The run: a bad config refused before anything is written, the loop (its guards, its
cadences, one compilation of its step), --mode=eval."""

import json

import jax
import numpy as np
import pytest
from test_steps import lowerings

from alexnet_jax import UsageError, evaluation, train


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"input.dataset": "imagenet"}, "input.dataset='imagenet' is unknown"),
        ({"input.image_size": 60}, "Use at least 67"),
        ({"input.resize_size": 60}, "input.resize_size=60 must be at least"),
        ({"batch_size": 0}, "^batch_size=0 must be positive"),
        ({"optimizer.base_batch_size": -1}, "optimizer.base_batch_size=-1 must be positive"),
        ({"per_device_batch_size": 0}, "per_device_batch_size=0 must be positive"),
        ({"batch_size": 12, "mesh.data": 8}, "not divisible by mesh.data=8"),
        ({"mesh.model": 4}, "mesh.model=4 is not possible"),
        ({"mesh.data": 8, "mesh.model": 2}, "needs 16 devices but 8 are visible"),
        ({"model.variant": "vgg"}, "model.variant='vgg' is unknown"),
        ({"optimizer.schedule": "linear"}, "optimizer.schedule='linear'"),
        ({"optimizer.name": "lars", "optimizer.decay_biases": True}, "LARS leaves biases out"),
        ({"model.dtype": "float16"}, "model.dtype='float16' is unknown"),
        ({"num_train_steps": -1, "num_epochs": 0}, "Set num_train_steps > 0"),
        ({"num_train_steps": 0}, r"num_train_steps=0: set a positive number of steps, or -1"),
        ({"model.towers": 1, "mesh.model": 2}, "one tower cannot be split over devices"),
        ({"profile_steps": "5"}, r"profile_steps='5': give 'N,M' with 0 < N < M"),
        ({"profile_steps": "4,2"}, r"profile_steps='4,2': give 'N,M'"),
        ({"eval_every_steps": 0}, "eval_every_steps=0 must be positive"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0 would keep no checkpoint"),
        ({"keep_checkpoints": -1}, "keep_checkpoints=-1 would keep no checkpoint"),
        # Named as set, not after the linear scaling rule (tiny's batch is not the base's).
        ({"optimizer.learning_rate": -0.01}, "^optimizer.learning_rate=-0.01 must be positive"),
        ({"optimizer.momentum": 1.5}, "optimizer.momentum=1.5 cannot train"),
        ({"optimizer.momentum": -1.0}, "optimizer.momentum=-1.0 cannot train"),
        ({"optimizer.weight_decay": -1.0}, "optimizer.weight_decay=-1.0 cannot train"),
        ({"optimizer.step_factor": -1.0}, "optimizer.step_factor=-1.0 cannot train"),
        ({"optimizer.step_every_steps": 0}, "optimizer.step_every_steps=0 cannot train"),
        ({"optimizer.plateau_factor": 2.0}, "optimizer.plateau_factor=2.0 cannot train"),
        ({"optimizer.plateau_patience": -1}, "optimizer.plateau_patience=-1 cannot train"),
        ({"input.stats_max_images": 0}, "input.stats_max_images=0: the mean and PCA need"),
        ({"input.dataset": "imagefolder", "input.data_dir": "/nonexistent"}, "does not exist"),
    ],
)
def test_bad_config_is_refused_before_compiling(tiny, overrides, message, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.train_and_evaluate(tiny(**overrides), str(workdir))
    assert not workdir.exists()  # nothing written: no workdir, no run.lock


def test_wrong_num_classes_for_the_data(tiny, tmp_path):
    with pytest.raises(UsageError, match="has 10 classes but model.num_classes=7"):
        train.train_and_evaluate(tiny(**{"model.num_classes": 7}), str(tmp_path))


def test_a_diverging_run_stops_before_saving_a_nan_state(tiny, tmp_path):
    config = tiny(**{"optimizer.learning_rate": 1e6, "log_every_steps": 8})
    with pytest.raises(UsageError, match="loss became NaN or infinite by step 4"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))  # the NaN state was not saved


def test_the_loop_compiles_its_step_once_and_logs_its_input_wait(tiny, tmp_path):
    import json

    with lowerings("_train_step") as compiled:
        train.train_and_evaluate(tiny(), str(tmp_path))
    assert len(compiled) == 1  # the running sums come back in the form they went in
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    waits = [x["train/data_wait_fraction"] for x in lines if "train/loss" in x]
    assert len(waits) == 2 and all(0.0 <= w <= 1.0 for w in waits)


def test_a_failed_evaluation_and_a_sigterm_cost_nothing_and_the_resume_is_exact(
    tiny, tmp_path, monkeypatch
):
    """Step 4's evaluation fails after its checkpoint; the resumed run evaluates step 4
    first, then a SIGTERM during step 7 saves step 7 (not a log step: the train sums of steps
    7 travel with it); the last resume ends where an uninterrupted run ends, metrics.jsonl
    and plateau state included."""
    import os
    import signal

    from alexnet_jax import checkpoint, lifecycle

    config = tiny(log_every_steps=2, **{"optimizer.schedule": "plateau"})
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    train.train_and_evaluate(config, str(whole))

    real = evaluation.evaluate

    def fails_at_4(trainer, state, step, *args, **kwargs):
        if step == 4:
            raise UsageError("an evaluation that failed")
        return real(trainer, state, step, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", fails_at_4)
    with pytest.raises(UsageError, match="an evaluation that failed"):
        train.train_and_evaluate(config, str(broken))
    ckpt = checkpoint.Checkpointer(str(broken), read_only=True)
    assert ckpt.latest_step() == 4 and not ckpt.evaluated(4)
    monkeypatch.setattr(evaluation, "evaluate", real)

    should_stop = lifecycle.StopOnSignal.should_stop

    def sigterm_in_step_7(self, step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # the run's own handler receives it
        return should_stop(self, step)

    monkeypatch.setattr(lifecycle.StopOnSignal, "should_stop", sigterm_in_step_7)
    with pytest.raises(lifecycle.Stopped, match=r"stopped at step 7 \(SIGTERM\)") as stopped:
        train.train_and_evaluate(config, str(broken))
    assert stopped.value.status == 143
    assert checkpoint.Checkpointer(str(broken), read_only=True).latest_step() == 7
    monkeypatch.setattr(lifecycle.StopOnSignal, "should_stop", should_stop)
    train.train_and_evaluate(config, str(broken))

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    a, b = (checkpoint.Checkpointer(str(w), read_only=True).read(8, one) for w in (broken, whole))
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(b.state["plateau"]))
    jax.tree.map(np.testing.assert_array_equal, a.state, b.state)
    lines = lambda w: [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    strip = lambda m: {k: v for k, v in m.items() if "per_sec" not in k and "wait" not in k}
    assert len(lines(whole)) == 6  # train lines at 2, 4, 6, 8; eval lines at 4, 8
    assert [strip(m) for m in lines(broken)] == [strip(m) for m in lines(whole)]


@pytest.mark.slow  # three short runs
def test_a_bad_validation_image_costs_no_checkpoint_and_the_resume_is_exact(tiny, tmp_path):
    """The checkpoint of step 4 is written before step 4's evaluation, which fails on a
    truncated image; once the image is fixed, the resumed run evaluates step 4 first and ends
    with the state (parameters and plateau rule) of a run that never failed."""
    from conftest import write_folder

    from alexnet_jax import checkpoint

    data = tmp_path / "data"
    write_folder(data, per_class=8)
    bad = data / "validation" / "dog" / "1.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated
    config = tiny(
        **{
            "input.dataset": "imagefolder",
            "input.data_dir": str(data),
            "model.num_classes": 2,
            "optimizer.schedule": "plateau",
        }
    )
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    with pytest.raises(UsageError, match=r"could not be decoded: .*validation/dog/1\.png"):
        train.train_and_evaluate(config, str(broken))
    assert (broken / "checkpoints" / "4").is_dir()  # saved before the evaluation failed
    assert not checkpoint.Checkpointer(str(broken)).evaluated(4)

    bad.write_bytes(good)
    train.train_and_evaluate(config, str(broken))
    train.train_and_evaluate(config, str(whole))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    a, b = (checkpoint.Checkpointer(str(w), read_only=True).read(8, one) for w in (broken, whole))
    assert a.data["evaluated"] is False  # the final save also precedes its evaluation
    plateau = jax.tree.leaves(b.state["plateau"])
    assert any(np.any(np.asarray(x) != 0) for x in plateau)  # the evaluations reached it
    jax.tree.map(np.testing.assert_array_equal, a.state, b.state)
    lines = lambda w: [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    strip = lambda m: {k: v for k, v in m.items() if "per_sec" not in k and "wait" not in k}
    assert [strip(m) for m in lines(broken)] == [strip(m) for m in lines(whole)]


def test_skip_corrupt_leaves_out_the_images_that_do_not_decode(tiny, tmp_path):
    from conftest import write_folder

    data = tmp_path / "data"
    write_folder(data, per_class=8)
    for split in ("train", "validation"):
        (data / split / "cat" / "2.png").write_bytes(b"")  # empty
    config = tiny(
        **{
            "input.dataset": "imagefolder",
            "input.data_dir": str(data),
            "input.skip_corrupt": True,
            "model.num_classes": 2,
        }
    )
    metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["eval/count"] == 15  # 16 validation images, one left out
    found = json.loads((tmp_path / "run" / "undecodable.json").read_text())
    assert [len(found["train"]), len(found["eval"])] == [1, 1]
    assert found["train_names"][0].endswith("train/cat/2.png")
    assert found["eval_names"][0].endswith("validation/cat/2.png")
    assert (tmp_path / "run" / "checkpoints" / "8").is_dir()


def test_profile_steps_leaves_a_trace_in_the_workdir(tiny, tmp_path):
    train.train_and_evaluate(tiny(num_train_steps=4, profile_steps="2,4"), str(tmp_path))
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 10_000


@pytest.mark.slow  # two short runs
def test_the_accelerator_config_runs_3_steps_in_bfloat16_with_lars_and_refuses_sgd(tmp_path):
    from alexnet_jax.metrics import read_metrics
    from configs import accelerator

    assert "srun" in accelerator.__doc__ and "tpu-vm ssh" in accelerator.__doc__
    assert accelerator.get_config().optimizer.name == "sgd"
    config = accelerator.get_config("lars")
    assert (config.model.dtype, config.optimizer.name, config.per_device_batch_size) == (
        "bfloat16",
        "lars",
        256,
    )
    # Its own settings, at a size this machine trains: the digits, 2 images per device.
    config.input.dataset, config.model.num_classes, config.model.width = "digits", 10, 0.125
    config.input.image_size, config.input.resize_size = 67, 72
    config.per_device_batch_size, config.num_train_steps = 2, 3
    config.log_every_steps, config.eval_every_steps = 1, 3
    config.checkpoint_every_steps = 3
    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(metrics["eval/loss"])
    first = [m for m in read_metrics(tmp_path) if "train/learning_rate" in m][0]
    # Global batch 2 x 8 = 16; the warm-up of 5 epochs of 1,437 digits is 449 steps.
    warmup = round(5 * 1437 / 16)
    assert first["train/learning_rate"] == pytest.approx(0.15625 * 16 / 128 / warmup, rel=1e-4)
    from alexnet_jax import checkpoint

    assert checkpoint.Checkpointer(tmp_path, read_only=True).data(3)["optimizer"] == "lars"
    config.num_train_steps, config.optimizer.name = 6, "sgd"  # resumed with the other one
    with pytest.raises(UsageError, match="written by optimizer.name=lars") as e:
        train.train_and_evaluate(config, str(tmp_path))
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match="use one of"):
        accelerator.get_config("adam")


def test_a_workdir_trained_past_the_runs_last_step_is_refused(trained_on_4x2, tmp_path):
    import shutil

    config, trained = trained_on_4x2
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    shorter = config.copy_and_resolve_references()
    shorter.num_train_steps = 2
    with pytest.raises(UsageError, match=r"was trained to step 4, past this run's last step 2"):
        train.train_and_evaluate(shorter, str(workdir))
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.name != "run.lock"}
    assert after == {p: t for p, t in before.items() if p.name != "run.lock"}
