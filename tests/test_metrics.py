"""Metric sums and means, metrics.jsonl, the layer table."""

import json

import jax
import jax.numpy as jnp
import pytest

from alexnet_jax.metrics import Accumulator, MetricsWriter, means
from alexnet_jax.model import AlexNet, layer_table


def test_means_of_summed_metrics():
    sums = Accumulator()
    for loss, top1, top5, count in ((6.0, 2.0, 1.0, 4.0), (2.0, 1.0, 0.0, 4.0)):
        step = {"loss": loss, "top1_errors": top1, "top5_errors": top5, "count": count}
        sums.add(jax.tree.map(jnp.float32, step))
    assert means(sums.pop(), "x") == {
        "x/loss": 1.0,
        "x/top1_error": 3.0 / 8,
        "x/top5_error": 1.0 / 8,
    }
    assert sums.total is None  # popped: the next add starts a new sum
    sums.add({"loss": jnp.float32(3.0), "top1_errors": 0.0, "top5_errors": 0.0, "count": 2.0})
    assert means(sums.pop(), "x")["x/loss"] == 1.5


@pytest.mark.parametrize("depth", [1, 2])
def test_the_host_waits_for_the_step_depth_steps_back(monkeypatch, depth):
    waited = []
    monkeypatch.setattr(jax, "block_until_ready", waited.append)
    sums = Accumulator(depth)
    for step in range(5):
        sums.add({"step": jnp.float32(step)})
        # After dispatching `step`, every step up to step - depth has finished.
        assert [float(w["step"]) for w in waited] == list(range(max(step - depth + 1, 0)))
    assert float(sums.total["step"]) == 10.0


def test_metrics_jsonl_has_a_line_per_write_and_only_on_process_0(tmp_path):
    MetricsWriter(str(tmp_path / "a"), active=True).write(5, {"train/loss": 0.5})
    writer = MetricsWriter(str(tmp_path / "a"), active=True)
    writer.write(10, {"eval/loss": 0.25, "eval/count": 360})
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 5, "train/loss": 0.5},
        {"step": 10, "eval/loss": 0.25, "eval/count": 360},
    ]
    assert list((tmp_path / "a" / "tensorboard").iterdir())
    MetricsWriter(str(tmp_path / "b"), active=False).write(5, {"train/loss": 0.5})
    assert not (tmp_path / "b").exists()


def _events(directory):
    """(tag, step) of every scalar in the TensorBoard event files under `directory`."""
    import tensorflow as tf

    seen = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            seen += [(v.tag, event.step) for v in event.summary.value]
    return seen


def test_a_resume_leaves_each_step_once_in_tensorboard(tmp_path):
    first = MetricsWriter(str(tmp_path), active=True)
    for step in range(1, 7):
        first.write(step, {"train/loss": 1.0 / step})
    first.write(4, {"eval/loss": 0.5})
    assert _events(tmp_path / "tensorboard").count(("train/loss", 5)) == 1
    resumed = MetricsWriter(str(tmp_path), active=True)  # resumed from the checkpoint of step 4
    assert resumed.drop_after(4) == 2
    for step in (5, 6):
        resumed.write(step, {"train/loss": 2.0 / step})
    seen = _events(tmp_path / "tensorboard")
    want = [("train/loss", s) for s in range(1, 7)] + [("eval/loss", 4)]
    assert sorted(seen, key=str) == sorted(want, key=str)  # each step once
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 4, 5, 6]


def test_the_layer_table_of_the_paper_model():
    model = AlexNet()
    params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 227, 227, 3)))["params"]
    )
    rows = layer_table(model, params, 227).splitlines()
    assert rows[1].split() == ["conv1", "55x55x96", "34,944"]  # 11*11*3*96 + 96
    assert rows[2].split() == ["conv1", "pool", "27x27x96"]
    assert rows[-2].split() == ["fc8", "1000", "4,097,000"]
    assert rows[-1].split() == ["total", "60,965,224"]
