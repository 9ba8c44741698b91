"""Evaluation: --mode=eval on a checkpoint, beside a run that holds the workdir; a process's
share of the batch. (A run's own evaluations are tested in test_train.py.)"""

import os

import jax
import numpy as np
import pytest

from alexnet_jax import UsageError, evaluation, parallel, steps


def test_eval_mode_scores_a_checkpoint_both_ways_and_changes_none(trained_on_4x2, tmp_path):
    import json
    import shutil

    config, trained = trained_on_4x2
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    ckpts = workdir / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained_eval = [x for x in lines if "eval/loss" in x][-1]

    other = config.copy_and_resolve_references()
    other.model.width = 0.5  # ignored: the checkpoint's model is evaluated
    from etils import epath

    from alexnet_jax import lifecycle

    with lifecycle.WorkdirLock(epath.Path(workdir)):  # as if a training run held it
        m = evaluation.evaluate_checkpoint(other, str(workdir))
    assert m["eval/count"] == m["eval_ten_crop/count"] == 360
    # The centre crop reproduces the training run's own evaluation of that checkpoint.
    assert trained_eval["step"] == 4
    assert m["eval/loss"] == pytest.approx(trained_eval["eval/loss"], rel=1e-5)
    assert m["eval/top1_error"] == trained_eval["eval/top1_error"]
    assert m["eval_ten_crop/loss"] != m["eval/loss"]  # the ten patches are another evaluation
    assert (workdir / "metrics.jsonl").read_text().splitlines()[-1] == json.dumps(trained_eval)
    (line,) = (workdir / "eval_mode" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line) == {"step": 4, **m}
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before

    with pytest.raises(UsageError, match=r"No checkpoint at step 3 .* holds steps \[4\]"):
        evaluation.evaluate_checkpoint(config, str(workdir), step=3)
    with pytest.raises(UsageError, match="No checkpoints in"):
        evaluation.evaluate_checkpoint(config, str(tmp_path / "empty"))


def test_one_process_reads_every_row_on_the_cores_it_has(tiny):
    config = tiny(**{"mesh.data": 4, "mesh.model": 2, "batch_size": 16})
    trainer = steps.Trainer(config, parallel.create_mesh(4, 2))
    share = evaluation.host_input(trainer)
    assert jax.process_count() == 1
    assert share["batch_size"] == 16 and list(share["rows"]) == list(range(16))
    assert share["threads"] == len(os.sched_getaffinity(0))


def test_a_non_finite_evaluation_stops_with_one_line(tiny):
    from alexnet_jax import input_stats, transforms

    config = tiny()
    trainer = steps.Trainer(config, parallel.create_mesh(1, 1))
    state = trainer.init_state(0)
    source = evaluation.open_source(config)
    stats = input_stats.get_stats(source, config.input.resize_size, 100, None)
    p = transforms.Preprocess.from_config(config.input, stats)
    finite = evaluation.evaluate(trainer, state, 0, source, p)
    assert np.isfinite(finite["eval/loss"])
    broken = {**state.params, "fc8": {**state.params["fc8"]}}
    broken["fc8"]["bias"] = state.params["fc8"]["bias"] + np.float32(np.inf)  # as if diverged
    with pytest.raises(UsageError, match=r"The evaluation loss of step 3 is (inf|nan): the"):
        evaluation.evaluate(trainer, state.replace(params=broken), 3, source, p)
