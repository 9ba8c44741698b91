"""A run: the training loop with its periodic work (log, save, evaluate, stop). The config is
checked first (config_checks.py); the jitted pieces it runs are in steps.py, its evaluations
in evaluation.py."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from alexnet_jax import (
    backend,
    checkpoint,
    cluster,
    evaluation,
    input_stats,
    lifecycle,
    loaders,
    parallel,
    sources,
    transforms,
)
from alexnet_jax.batch import Batch
from alexnet_jax.config_checks import check_config, profile_window, resolve_batch_size
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import (
    InFlight,
    MetricsWriter,
    log_train,
    means,
)
from alexnet_jax.model import layer_table
from alexnet_jax.steps import Trainer, TrainState

# -------------------------------------------------------------------------------------- loop


def optimizer_name(config: ml_collections.ConfigDict) -> str:
    return config.optimizer.get("name", "sgd")


def num_train_steps(config: ml_collections.ConfigDict, train_size: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return config.num_epochs * train_size // config.batch_size


def checkpoint_stats(
    ckpt: checkpoint.Checkpointer, step: int, data_stats: transforms.Stats
) -> transforms.Stats:
    """The input statistics a resumed run normalises with: those its weights were trained
    with, saved in the checkpoint. They equal the data's, except for converted weights
    (convert_torchvision: torchvision's mean and std), which fine-tuning must keep."""
    saved = transforms.Stats.from_dict(ckpt.data(step)["stats"])
    if saved == data_stats:  # the mean image, not compared, is the data's as well
        return data_stats
    logging.info("input statistics from the checkpoint at step %d: %s", step, saved.to_dict())
    return dataclasses.replace(saved, mean_image=ckpt.mean_image(step))


def stop_if_diverged(loss_sum: jax.Array, step: int, ckpt: checkpoint.Checkpointer) -> None:
    """The sum covers every step since the last log line, so one NaN anywhere shows here."""
    if not jnp.isfinite(loss_sum):
        last = ckpt.latest_step()
        raise UsageError(
            f"The training loss became NaN or infinite by step {step}. Lower "
            "--config.optimizer.learning_rate (or check the input scale); the newest "
            f"checkpoint ({'step ' + str(last) if last is not None else 'none'}) is intact."
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    allow_config_changes: bool = False,
) -> dict[str, float]:
    """Train (resuming from workdir's newest checkpoint) and return the final eval metrics.
    The run holds its workdir (lifecycle.WorkdirLock); on SIGTERM/SIGINT it saves the step it
    reached and raises lifecycle.Stopped. A
    resume with other settings than the checkpoint's is refused (`checkpoint.check_resume`) unless
    `allow_config_changes`."""
    config = resolve_batch_size(config, jax.device_count())
    check_config(config, jax.device_count(), jax.process_count())
    source = evaluation.open_source(
        config
    )  # a missing dataset is refused before the workdir is made
    workdir = lifecycle.workdir_path(workdir)  # gs://... stays a URL
    lifecycle.writable_dir(workdir)
    lock = lifecycle.lock_workdir(workdir)
    try:
        with lifecycle.StopOnSignal() as stop:
            return _train_and_evaluate(config, workdir, source, stop, allow_config_changes)
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    source: sources.Source,
    stop: lifecycle.StopOnSignal,
    allow_config_changes: bool,
) -> dict[str, float]:
    # Check everything, then restore (which refuses a checkpoint this run cannot resume),
    # before anything is written.
    lifecycle.check_same_workdir(workdir)
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.model)
    source = evaluation.skip_corrupt(config, source, workdir)
    trainer = Trainer(
        config,
        mesh,
        total_steps=num_train_steps(config, source.train.size),
        steps_per_epoch=source.train.size / config.batch_size,
    )
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    restored = ckpt.restore(
        trainer.abstract_state, optimizer_name(config), config, allow_config_changes
    )
    reached = 0 if restored is None else int(jax.device_get(restored.step))
    if reached > trainer.total_steps:
        raise UsageError(
            f"{workdir} was trained to step {reached}, past this run's last step "
            f"{trainer.total_steps} (num_train_steps or num_epochs). To evaluate one of its "
            "checkpoints use --mode=eval [--step=N]; to train that many steps use a new "
            "--workdir. Nothing was changed."
        )
    run = _Run(config, workdir, trainer, source, ckpt, restored)
    state = run.initial_state(restored)
    batches = run.train_batches()
    consts = trainer.input_constants(transforms.device_constants(run.preprocess))
    in_flight = InFlight(backend.dispatch_depth(jax.default_backend()))
    sums = run.initial_sums()  # summed on the devices over the steps since the last log line
    try:
        if run.pending_eval or run.start >= run.total:
            state = run.evaluate_first(state)
        for step in range(run.start + 1, run.total + 1):
            run.profile.begin(step)
            state, sums = trainer.train_step(state, run.next_batch(batches), sums, consts)
            in_flight.add(sums)
            run.profile.end(step, sums)
            saving, logging_now = run.is_save_step(step), run.is_log_step(step)
            if saving or logging_now:
                stop_if_diverged(sums["loss"], step, ckpt)
            if logging_now:
                ckpt.check()  # a save that failed in the background stops the run here
                sums = run.log(step, sums)
            if saving:
                run.save(step, state, sums, evaluated=False)
            if run.is_eval_step(step):
                state = run.evaluate(state, step)
            if stop.should_stop(step) and step < run.total:
                run.stop_early(step, state, sums, stop.received, saved=saving)
    finally:
        run.profile.close()
        ckpt.close()  # waits until the saves begun are written, whatever stopped the loop
    return run.eval_metrics


class _Profile:
    """A jax.profiler trace of steps [first, end) in `directory` (config.profile_steps)."""

    def __init__(self, window: tuple[int, int] | None, directory: epath.Path) -> None:
        self.window, self.directory, self.tracing = window, directory, False

    def begin(self, step: int) -> None:
        if self.window and step == self.window[0]:
            jax.profiler.start_trace(os.fspath(self.directory))
            self.tracing = True

    def end(self, step: int, outputs: Any) -> None:
        if self.tracing and step == self.window[1] - 1:
            jax.block_until_ready(outputs)  # the trace holds the steps' device work
            self.close()
            logging.info("profile of steps %d-%d in %s", self.window[0], step, self.directory)

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


class _Run:
    """One training run: its data, its cadences, and the periodic work the loop calls (log,
    save, evaluate, stop), with the clock and input wait of the current log interval."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: epath.Path,
        trainer: Trainer,
        source: sources.Source,
        ckpt: checkpoint.Checkpointer,
        restored: TrainState | None,
    ) -> None:
        self.config, self.trainer, self.source, self.ckpt = config, trainer, source, ckpt
        first = evaluation.is_first()
        self.start = 0 if restored is None else int(jax.device_get(restored.step))
        # Data: statistics (cached in workdir; a resumed run keeps its checkpoint's),
        # preprocessing, the number of steps.
        i = config.input
        stats = input_stats.get_stats(
            source, i.resize_size, i.stats_max_images, workdir, write=first
        )
        if restored is not None:
            stats = checkpoint_stats(ckpt, self.start, stats)
        self.stats = stats
        self.preprocess = transforms.Preprocess.from_config(i, stats)
        self.data_meta = {
            "class_names": source.class_names,
            "stats": stats.to_dict(),
            "optimizer": optimizer_name(config),
        }
        self.total = trainer.total_steps
        self.input = evaluation.host_input(trainer)
        few = cluster.few_input_cores(
            self.input["threads"], jax.local_device_count(), jax.default_backend()
        )
        if few:
            logging.warning(few)
        logging.info(
            "mesh %s on %d devices; %d train / %d eval examples; %d steps of %d, of which this "
            "process reads %d",
            dict(trainer.mesh.shape),
            jax.device_count(),
            source.train.size,
            source.eval.size,
            self.total,
            config.batch_size,
            len(self.input["rows"]),
        )
        # A checkpoint is written before its step's evaluation (which may fail, e.g. on a bad
        # image), so a run resumed from one that was not evaluated evaluates it first: the
        # plateau rule then sees what the uninterrupted run saw.
        self.pending_eval = (
            self.start > 0 and self.is_eval_step(self.start) and not ckpt.evaluated(self.start)
        )
        self.writer = MetricsWriter(workdir, active=first)
        dropped = self.writer.drop_after(self.start, evals_too=self.pending_eval)
        if dropped:
            logging.info("dropped %d metrics.jsonl lines this run writes again", dropped)
        self.profile = _Profile(profile_window(config), workdir / "profile")
        self.eval_metrics: dict[str, float] = {}
        self.t_log, self.last_log, self.waited = time.time(), self.start, 0.0

    def initial_state(self, restored: TrainState | None) -> TrainState:
        """The restored state, or a fresh one; the model's layer table goes to the log."""
        if restored is None:
            state = self.trainer.init_state(self.config.seed)
        else:
            state = restored
            logging.info("resumed from the checkpoint at step %d", self.start)
        table = layer_table(self.trainer.model, state.params, self.config.input.image_size)
        logging.info("AlexNet (%s):\n%s", self.config.model.variant, table)
        return state

    def initial_sums(self) -> dict:
        """The running sums of the interval the checkpoint was saved in, so that the first
        train line after a resume is the one an uninterrupted run writes (zero at a log step,
        and in checkpoints that predate them)."""
        sums = self.trainer.zero_sums()
        saved = self.ckpt.data(self.start).get("train_sums") if self.start > 0 else None
        if saved:
            put = lambda v: jax.device_put(jnp.float32(v), sums["loss"].sharding)
            sums = {k: put(saved[k]) for k in sums}
        return sums

    def train_batches(self) -> Iterator[Batch]:
        """The train stream from the run's position, copied to the devices ahead of the loop;
        the first log interval starts here."""
        stream = dict(seed=self.config.seed, start_step=self.start, num_steps=self.total)
        batches = loaders.train_batches(self.source, self.preprocess, **stream, **self.input)
        self.t_log = time.time()
        return parallel.prefetch(self.trainer.mesh, batches, self.config.batch_size)

    def next_batch(self, batches: Iterator[Batch]) -> Batch:
        """The next batch, its wait counted towards the interval's data_wait_fraction."""
        t = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - t
        return batch

    def is_log_step(self, step: int) -> bool:
        return step % self.config.log_every_steps == 0 or step == self.total

    def is_save_step(self, step: int) -> bool:
        return step % self.config.checkpoint_every_steps == 0 or step == self.total

    def is_eval_step(self, step: int) -> bool:
        return step % self.config.eval_every_steps == 0 or step == self.total

    def log(self, step: int, sums: dict) -> dict:
        """Log and write the train line of the interval that ends at `step`; returns zero
        sums for the next one."""
        now = time.time()
        ips = (step - self.last_log) * self.config.batch_size / (now - self.t_log)
        host = jax.device_get(sums)
        line = {
            **means(host, "train"),
            "train/learning_rate": float(host["learning_rate"]),
            "train/images_per_sec": ips,
            "train/data_wait_fraction": self.waited / (now - self.t_log),
        }
        log_train(step, self.total, self.config.batch_size, line)
        self.writer.write(step, line)
        self.t_log, self.last_log, self.waited = now, step, 0.0
        return self.trainer.zero_sums()

    def save(self, step: int, state: TrainState, sums: dict, evaluated: bool) -> None:
        # The float32 sums as Python floats: JSON keeps them exactly.
        train_sums = {k: float(v) for k, v in jax.device_get(sums).items()}
        data = {**self.data_meta, "evaluated": evaluated, "train_sums": train_sums}
        self.ckpt.save(step, state, self.config, data, self.stats.mean_image)

    def evaluate(self, state: TrainState, step: int) -> TrainState:
        """Evaluate `step`, write its line, and feed the plateau rule."""
        self.eval_metrics = evaluation.evaluate(
            self.trainer, state, step, self.source, self.preprocess
        )
        self.writer.write(step, self.eval_metrics)
        if self.config.optimizer.schedule == "plateau":
            value = jnp.float32(self.eval_metrics["eval/top1_error"])
            state = state.replace(plateau=self.trainer.update_plateau(state.plateau, value))
        return state

    def evaluate_first(self, state: TrainState) -> TrainState:
        """Before training: the step the run resumes from, when its evaluation is missing or
        when there is nothing left to train."""
        if self.start >= self.total:
            logging.info("workdir already holds the final step %d; evaluating it", self.total)
        else:
            logging.info("evaluating step %d first: its checkpoint preceded that", self.start)
        return self.evaluate(state, self.start)

    def stop_early(
        self, step: int, state: TrainState, sums: dict, signal: str, saved: bool
    ) -> NoReturn:
        """Stop at `step` on a signal: save it (unless this step just did), wait until the
        save is on disk, say how to resume, and raise lifecycle.Stopped."""
        if not saved:
            stop_if_diverged(sums["loss"], step, self.ckpt)
            self.save(step, state, sums, evaluated=self.is_eval_step(step))
        self.ckpt.wait()
        message = (
            f"stopped at step {step} of {self.total} ({signal}); its checkpoint is saved. Run "
            "the same command to resume."
        )
        logging.warning(message)
        print(message, file=sys.stderr, flush=True)
        raise lifecycle.Stopped(signal, step)
