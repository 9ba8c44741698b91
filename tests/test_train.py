"""Train state, the step (one compilation, the scheduled rate), the loop's checks and guards."""

import contextlib
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import UsageError, input_pipeline, parallel, sources, train
from alexnet_jax.metrics import Accumulator


def _trainer(config):
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.model)
    return train.Trainer(config, mesh), mesh


def _fixed_batch(config, n=None, on_device=False):
    """The first train batch: float32 images, or uint8 crops to normalise on the device."""
    source = sources.create_source(config.input)
    stats = input_pipeline.get_stats(source, config.input.resize_size, 100, None)
    preprocess = input_pipeline.Preprocess.from_config(config.input, stats)
    ds = input_pipeline.train_dataset(
        source,
        dataclasses.replace(preprocess, on_device=on_device),
        seed=0,
        batch_size=n or config.batch_size,
        start_step=0,
        num_steps=1,
    )
    return next(ds.as_numpy_iterator())


def _grad(trainer, batch):
    """The gradient of the mean loss on `batch` without dropout, jitted."""
    loss = lambda p: trainer.loss_fn(p, batch["images"], batch["labels"], ())[0]
    return jax.jit(jax.grad(loss))


@contextlib.contextmanager
def lowerings(name: str):
    """The jitted functions called `name` that JAX lowers (once per compilation), as seen
    through jax.monitoring's compilation events."""
    seen = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            if kwargs.get("fun_name") == f"jit({name})":
                seen.append(kwargs["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_plateau_scale_changes_only_when_told(tiny):
    config = tiny(**{"optimizer.schedule": "plateau", "optimizer.plateau_patience": 1})
    trainer, mesh = _trainer(config)
    p = trainer.init_state(0).plateau
    p = trainer.update_plateau(p, jnp.float32(0.5))
    assert float(p.scale) == 1.0
    p = trainer.update_plateau(p, jnp.float32(0.5))  # no improvement, patience 1: cut
    assert float(p.scale) == pytest.approx(0.1)
    for _ in range(5):
        p = trainer.update_plateau(p, jnp.float32(0.5))
    assert float(p.scale) == pytest.approx(1e-3)  # the paper's three cuts, then no more


@pytest.mark.parametrize("variant", ["paper", "owt"])
def test_one_step_lowers_the_loss_and_compiles_once(tiny, variant):
    owt = (
        {"model.variant": "owt", "model.towers": 1, "model.lrn": False} if variant == "owt" else {}
    )
    # A step small enough to be a descent step: at 0.01 momentum overshoots on some batches.
    config = tiny(**{"model.dropout_rate": 0.0, "optimizer.learning_rate": 1e-3, **owt})
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    loss_fn = jax.jit(lambda p: trainer.loss_fn(p, batch["images"], batch["labels"], ())[0])
    loss = lambda s: float(loss_fn(s.params))
    before = loss(state)
    params0 = jax.device_get(state.params)
    sums = Accumulator()  # bounded dispatch, as the training loop does
    with lowerings("_train_step") as compiled:
        for _ in range(3):
            state, metrics = trainer.train_step(state, batch)
            sums.add(metrics)
    assert len(compiled) == 1  # one compilation for every step
    assert int(state.step) == 3
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), params0, jax.device_get(state.params)
    )
    assert all(jax.tree.leaves(changed))
    assert loss(state) < before


def test_the_step_takes_the_scheduled_rate_times_the_plateau_scale(tiny):
    config = tiny(**{"model.dropout_rate": 0.0, "optimizer.schedule": "plateau"})
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    state = state.replace(plateau=state.plateau._replace(scale=jnp.asarray(0.1, jnp.float32)))
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    params = jax.device_get(state.params)
    grads = jax.device_get(_grad(trainer, batch)(state.params))
    state, metrics = trainer.train_step(state, batch)
    lr = 0.01 * 0.1  # optimizer.learning_rate times the plateau's scale
    assert float(metrics["learning_rate"]) == pytest.approx(lr)
    # The first step from zero velocity: w <- w - lr (g + wd w), decay on kernels only.
    for name in params:
        for leaf, wd in (("kernel", 5e-4), ("bias", 0.0)):
            w, g = params[name][leaf], grads[name][leaf]
            want = w - lr * (g + wd * w)
            assert not np.allclose(want, w - 0.01 * (g + wd * w))  # the scale shows
            got = np.asarray(state.params[name][leaf])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"{name}/{leaf}")


def test_a_small_batch_can_be_overfitted(tiny):
    config = tiny(**{"model.dropout_rate": 0.0, "batch_size": 8})
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    sums = Accumulator()  # bounded dispatch, as the training loop does
    for _ in range(150):  # at lr 0.01 the loss oscillates before it settles (~100 steps)
        state, metrics = trainer.train_step(state, batch)
        sums.add(metrics)
    assert float(metrics["top1_errors"]) == 0.0
    assert float(metrics["loss"]) / 8 < 0.05


def test_init_is_sharded_and_the_same_on_every_mesh(tiny):
    ref = jax.device_get(train.Trainer(tiny(), parallel.create_mesh(1, 1)).init_state(0).params)
    trainer, mesh = _trainer(tiny(**{"mesh.data": 4, "mesh.model": 2}))
    params = trainer.init_state(0).params
    k = params["conv2"]["kernel"]
    assert k.sharding == NamedSharding(mesh, P(None, None, None, "model"))
    assert k.addressable_shards[0].data.shape[-1] == k.shape[-1] // 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ref)


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
        ({"optimizer.schedule": "cosine"}, "optimizer.schedule='cosine'"),
        ({"model.dtype": "float16"}, "model.dtype='float16' is unknown"),
        ({"num_train_steps": -1, "num_epochs": 0}, "Set num_train_steps > 0"),
        ({"num_train_steps": 0}, r"num_train_steps=0: set a positive number of steps, or -1"),
        ({"model.towers": 1, "mesh.model": 2}, "one tower cannot be split over devices"),
        ({"profile_steps": "5"}, r"profile_steps='5': give 'N,M' with 0 < N < M"),
        ({"profile_steps": "4,2"}, r"profile_steps='4,2': give 'N,M'"),
        ({"eval_every_steps": 0}, "eval_every_steps=0 must be positive"),
    ],
)
def test_bad_config_is_refused_before_compiling(tiny, overrides, message, tmp_path):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.train_and_evaluate(tiny(**overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_wrong_num_classes_for_the_data(tiny, tmp_path):
    with pytest.raises(UsageError, match="has 10 classes but model.num_classes=7"):
        train.train_and_evaluate(tiny(**{"model.num_classes": 7}), str(tmp_path))


def test_a_diverging_run_stops_before_saving_a_nan_state(tiny, tmp_path):
    config = tiny(**{"optimizer.learning_rate": 1e6, "log_every_steps": 8})
    with pytest.raises(UsageError, match="loss became NaN or infinite by step 4"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))  # the NaN state was not saved


def test_the_paper_rule_is_the_one_the_trainer_uses(tiny):
    """A check that the rate sits inside the velocity in the real step: after a cut of the rate,
    the next update is 0.9 v - lr_new g, not lr_new (0.9 v' + g) as optax.sgd would give."""
    config = tiny(**{"model.dropout_rate": 0.0, "optimizer.weight_decay": 0.0})
    config.optimizer.schedule, config.optimizer.step_every_steps = "step", 1
    trainer, mesh = _trainer(config)
    state = trainer.init_state(0)
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    grad = _grad(trainer, batch)
    w0 = jax.device_get(state.params)
    g0 = jax.device_get(grad(state.params))
    state, _ = trainer.train_step(state, batch)  # lr 0.01
    w1 = jax.device_get(state.params)
    g1 = jax.device_get(grad(state.params))
    state, m = trainer.train_step(state, batch)  # lr 0.001: the schedule cut it
    assert float(m["learning_rate"]) == pytest.approx(0.001)
    k = lambda t: np.asarray(t["fc7"]["kernel"], np.float64)
    # Parameter differences carry float32 rounding of w (~1e-3 of the update): norm-relative.
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    v1 = -0.01 * k(g0)
    assert rel(k(w1) - k(w0), v1) < 1e-2
    want = 0.9 * v1 - 0.001 * k(g1)
    sgd = -0.001 * (0.9 * (v1 / -0.01) + k(g1))  # momentum first, then the rate
    assert rel(sgd, want) > 0.5
    assert rel(k(jax.device_get(state.params)) - k(w1), want) < 1e-2


def test_per_device_batch_size_sets_the_global_batch(tiny):
    config = tiny(**{"mesh.model": 2, "batch_size": 8})
    assert train.resolve_batch_size(config, 8) is config  # unset: batch_size as given
    config.per_device_batch_size = 3
    resolved = train.resolve_batch_size(config, 8)  # mesh (4, 2): 4 data shards
    assert (resolved.batch_size, config.batch_size) == (12, 8)
    config.per_device_batch_size = 0
    with pytest.raises(UsageError, match="per_device_batch_size=0 must be positive"):
        train.resolve_batch_size(config, 8)


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
        m = train.evaluate_checkpoint(other, str(workdir))
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
        train.evaluate_checkpoint(config, str(workdir), step=3)
    with pytest.raises(UsageError, match="No checkpoints in"):
        train.evaluate_checkpoint(config, str(tmp_path / "empty"))


def test_the_step_adds_its_sums_to_the_running_totals(tiny):
    config = tiny(**{"model.dropout_rate": 0.0})
    trainer, mesh = _trainer(config)
    batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
    state = trainer.init_state(0)
    copy = lambda s: jax.tree.map(jnp.copy, s)  # the step donates its state
    _, alone = trainer.train_step(copy(state), batch)
    totals = {k: v + i + 1.0 for i, (k, v) in enumerate(trainer.zero_sums().items())}
    _, added = trainer.train_step(copy(state), batch, totals)
    for k in ("loss", "top1_errors", "top5_errors", "count"):
        assert float(added[k]) == pytest.approx(float(totals[k]) + float(alone[k]), rel=1e-6)
    assert float(added["count"]) == config.batch_size + 4.0  # the totals were not zero
    assert float(added["learning_rate"]) == float(alone["learning_rate"])  # a rate, not summed


def test_the_loop_compiles_its_step_once_and_logs_its_input_wait(tiny, tmp_path):
    import json

    with lowerings("_train_step") as compiled:
        train.train_and_evaluate(tiny(), str(tmp_path))
    assert len(compiled) == 1  # the running sums come back in the form they went in
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    waits = [x["train/data_wait_fraction"] for x in lines if "train/loss" in x]
    assert len(waits) == 2 and all(0.0 <= w <= 1.0 for w in waits)


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


def test_bfloat16_compute_follows_float32_over_the_first_steps(tiny):
    """model.dtype=bfloat16 on the real step: parameters stay float32, and the losses of the
    first steps stay within 2% of float32's (bfloat16 keeps 8 bits of mantissa)."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny(**{"model.dtype": dtype, "mesh.data": 2, "mesh.model": 2})
        trainer, mesh = _trainer(config)
        batch = parallel.global_batch(mesh, _fixed_batch(config), config.batch_size)
        state = trainer.init_state(0)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
        losses[dtype] = []
        for _ in range(4):
            state, sums = trainer.train_step(state, batch)
            losses[dtype].append(float(sums["loss"] / sums["count"]))
    f32, bf16 = np.array(losses["float32"]), np.array(losses["bfloat16"])
    assert f32[-1] < f32[0]  # the steps move: the comparison can fail
    assert not np.array_equal(f32, bf16)  # bfloat16 did compute in lower precision
    np.testing.assert_allclose(bf16, f32, rtol=0.02)
