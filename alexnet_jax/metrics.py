"""What a run reports: metric sums gathered as steps are dispatched, their means, the lines of
metrics.jsonl and TensorBoard, and the console's log lines.

TensorFlow, which writes TensorBoard's events, is imported where they are written (process 0's
MetricsWriter) and nowhere else: the steps sum their metrics here on GPU images without it."""

from __future__ import annotations

import json
import os
from collections import deque
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath

from alexnet_jax import paths


class InFlight:
    """Keeps the host at most `depth` steps ahead of the devices. Unbounded async dispatch
    deadlocked XLA's CPU collectives (7 of 8 simulated devices waiting forever in an
    all-reduce rendezvous), so CPU runs use depth 1 (backend.dispatch_depth)."""

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self._queue: deque = deque()

    def add(self, outputs: Any) -> None:
        """Note a dispatched step's outputs, once fewer than `depth` earlier ones are unfinished."""
        while len(self._queue) >= self.depth:
            jax.block_until_ready(self._queue.popleft())
        self._queue.append(outputs)


class Accumulator:
    """Sums the metric sums of dispatched (eval) steps on the devices, dispatch bounded as in
    `InFlight`."""

    def __init__(self, depth: int = 1) -> None:
        self.total: dict | None = None  # on the devices
        self._in_flight = InFlight(depth)

    def add(self, sums: dict) -> None:
        """Add a step's sums once fewer than `depth` steps before it are unfinished."""
        self._in_flight.add(sums)
        self.total = sums if self.total is None else jax.tree.map(jnp.add, self.total, sums)

    def pop(self) -> dict:
        """The sums so far, on the host; the next `add` starts a new sum."""
        total, self.total = jax.device_get(self.total), None
        return total


def means(sums: dict, prefix: str) -> dict[str, float]:
    """Per-example loss and top-1/top-5 error from summed metrics (see parallel._sums)."""
    n = max(float(sums["count"]), 1.0)
    return {
        f"{prefix}/loss": float(sums["loss"]) / n,
        f"{prefix}/top1_error": float(sums["top1_errors"]) / n,
        f"{prefix}/top5_error": float(sums["top5_errors"]) / n,
    }


class MetricsWriter:
    """metrics.jsonl and TensorBoard events in workdir; silent on every process but 0."""

    def __init__(self, workdir: epath.PathLike, active: bool):
        self.active = active
        if active:
            import tensorflow as tf

            workdir = epath.Path(workdir)  # a gs://... URL stays one
            self.path = workdir / "metrics.jsonl"
            self.summary = tf.summary
            self.events = workdir / "tensorboard"
            self.tb = None  # opened by the first write, after drop_after's rewrite
            workdir.mkdir(parents=True, exist_ok=True)

    def drop_after(self, step: int, evals_too: bool = False) -> int:
        """Remove the lines of steps after `step`, and (evals_too) the eval lines of `step`,
        which a resumed run writes again; return how many there were."""
        if not self.active or not self.path.exists():
            return 0

        def keep(line: str) -> bool:
            m = json.loads(line)
            if evals_too and m.get("step") == step and "eval/loss" in m:
                return False
            return m.get("step", 0) <= step

        lines = self.path.read_text().splitlines(keepends=True)
        kept = [x for x in lines if x.strip() and keep(x)]
        if len(kept) < len(lines):
            paths.write_whole(self.path, "".join(kept))
            self._rewrite_events(kept)
        return len(lines) - len(kept)

    def _rewrite_events(self, lines: list[str]) -> None:
        """TensorBoard's events as metrics.jsonl now holds them: the event files, which hold the
        dropped steps too (TensorBoard would draw a resumed run's replayed steps twice), are
        replaced by one written from the kept lines."""
        if self.events.exists():
            for f in self.events.glob("events.out.tfevents.*"):
                f.unlink()
        for line in lines:
            metrics = json.loads(line)
            self._events(metrics.pop("step"), metrics)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._events(step, metrics)

    def _events(self, step: int, metrics: dict[str, float]) -> None:
        if self.tb is None:
            self.tb = self.summary.create_file_writer(os.fspath(self.events))
        with self.tb.as_default(step=step):
            for k, v in metrics.items():
                self.summary.scalar(k, v)
        self.tb.flush()


def read_metrics(workdir: epath.PathLike, name: str = "metrics.jsonl") -> list[dict]:
    """The lines of workdir/metrics.jsonl (or workdir/eval_mode/... with that `name`), oldest
    first; a last line cut short by a killed run is left out."""
    path = epath.Path(workdir) / name
    if not path.exists():
        raise FileNotFoundError(f"No {path}: train first, or check the workdir.")
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def format_eta(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def log_train(step: int, total: int, batch_size: int, line: dict[str, float]) -> None:
    ips = line["train/images_per_sec"]
    logging.info(
        "step %d/%d: loss %.4f, top-1 error %.4f, top-5 error %.4f, lr %.2e, %.1f images/s "
        "(%.0f%% waiting for input), ETA %s",
        step,
        total,
        line["train/loss"],
        line["train/top1_error"],
        line["train/top5_error"],
        line["train/learning_rate"],
        ips,
        100 * line["train/data_wait_fraction"],
        format_eta((total - step) * batch_size / ips),
    )


def log_eval(step: int, metrics: dict[str, float], prefix: str = "eval") -> None:
    logging.info(
        "%s step %d: loss %.4f, top-1 error %.4f, top-5 error %.4f (%d images)",
        prefix,
        step,
        metrics[f"{prefix}/loss"],
        metrics[f"{prefix}/top1_error"],
        metrics[f"{prefix}/top5_error"],
        metrics[f"{prefix}/count"],
    )
