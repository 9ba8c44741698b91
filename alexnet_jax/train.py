"""Train state, the jitted train and eval steps, and the training loop with its metrics."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath

from alexnet_jax import (
    checkpoint,
    cluster,
    device_input,
    input_pipeline,
    lifecycle,
    parallel,
    sources,
)
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import (
    Accumulator,
    InFlight,
    MetricsWriter,
    layer_table,
    log_eval,
    log_train,
    means,
)
from alexnet_jax.model import AlexNet
from alexnet_jax.optimizer import Optimizer, set_learning_rate


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array  # base key; step s uses fold_in(rng, s)
    plateau: Any  # reduce_on_plateau state, updated only after evaluations


def check_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
    """Every config error we can see before compiling, as a UsageError naming the fix.

    Each model and optimizer field is checked where it is used (AlexNet, optimizer.py), by
    building them here; this function adds the checks that span fields, the data or the mesh.
    """

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    need(config.batch_size > 0, f"batch_size={config.batch_size} must be positive.")
    model = AlexNet.from_config(config.model)
    Optimizer.from_config(config.optimizer, config.batch_size)
    i = config.input

    smallest = model.min_image_size()
    need(
        i.image_size >= smallest,
        f"input.image_size={i.image_size} is too small for the {model.variant} architecture: "
        f"its last pooling would have no output. Use at least {smallest}.",
    )
    need(
        i.resize_size >= i.image_size,
        f"input.resize_size={i.resize_size} must be at least input.image_size={i.image_size}.",
    )
    need(
        i.mean in input_pipeline.MEANS,
        f"input.mean={i.mean!r} is unknown; use one of {input_pipeline.MEANS}.",
    )
    need(
        config.num_train_steps == -1 or config.num_train_steps > 0,
        f"num_train_steps={config.num_train_steps}: set a positive number of steps, or -1 to "
        "train num_epochs epochs.",
    )
    need(
        config.num_train_steps > 0 or config.num_epochs > 0,
        "Set num_train_steps > 0, or num_train_steps=-1 and num_epochs > 0.",
    )
    profile_window(config)
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        need(config[key] > 0, f"{key}={config[key]} must be positive.")
    parallel.check_mesh(
        config.mesh.data,
        config.mesh.model,
        model.num_towers,
        config.batch_size,
        num_devices,
        process_count,
    )


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """config.profile_steps "N,M" as (N, M): the trace covers steps N to M-1."""
    text = str(config.get("profile_steps") or "").strip()
    if not text:
        return None
    try:
        first, end = (int(x) for x in text.split(","))
    except ValueError:
        first, end = 0, 0
    if not 0 < first < end:
        raise UsageError(
            f"profile_steps={text!r}: give 'N,M' with 0 < N < M, e.g. --config.profile_steps=10,15 "
            "traces steps 10 to 14."
        )
    return first, end


def resolve_batch_size(
    config: ml_collections.ConfigDict, num_devices: int
) -> ml_collections.ConfigDict:
    """The config, with batch_size = per_device_batch_size x mesh.data where that is set."""
    per = config.get("per_device_batch_size")
    if per is None:
        return config
    if per <= 0:
        raise UsageError(f"per_device_batch_size={per} must be positive (or unset).")
    data, _ = parallel.mesh_shape(config.mesh.data, config.mesh.model, num_devices)
    config = config.copy_and_resolve_references()
    config.batch_size = per * data
    logging.info("batch_size = %d per data shard x %d shards = %d", per, data, config.batch_size)
    return config


# ------------------------------------------------------------------------------------- steps


class Trainer:
    """The jitted pieces of one run, built once for a config and a mesh."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self.model = AlexNet.from_config(config.model)
        self.optimizer = Optimizer.from_config(config.optimizer, config.batch_size)
        self.image_size = config.input.image_size
        self.batch_size = config.batch_size
        self.rows = parallel.process_rows(mesh, config.batch_size)  # what this process reads
        self.input_threads = cluster.input_threads(os.environ)  # and on how many cores
        abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        specs = parallel.param_specs(self.model, abstract.params, mesh)
        self.shardings = parallel.state_shardings(self.optimizer.tx, abstract, specs, mesh)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            self.shardings,
        )
        params = self.abstract_state.params
        replicated = parallel.replicated(mesh)
        self.loss_fn = parallel.make_loss_fn(self.model, params, mesh)
        self.normalize = parallel.batch_fn(device_input.normalize, mesh)
        self.train_step = jax.jit(
            self._train_step, donate_argnums=0, out_shardings=(self.shardings, replicated)
        )
        self.eval_steps = {  # the centre crop (False) and the paper's ten patches (True)
            ten: jax.jit(
                functools.partial(
                    self._eval_step, parallel.make_eval_fn(self.model, params, mesh, ten)
                ),
                out_shardings=replicated,
            )
            for ten in (False, True)
        }
        self.eval_step = self.eval_steps[config.input.eval_ten_crop]
        self.update_plateau = jax.jit(
            lambda p, v: self.optimizer.plateau.update(updates={}, state=p, value=v)[1],
            out_shardings=self.shardings.plateau,
        )

    def _init(self, key: jax.Array) -> TrainState:
        x = jnp.zeros((1, self.image_size, self.image_size, 3))
        params = self.model.init(key, x, train=False)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.optimizer.tx.init(params),
            rng=jax.random.fold_in(key, 1),
            plateau=self.optimizer.plateau.init(params),
        )

    def init_state(self, seed: int) -> TrainState:
        """Initialise directly into the shardings: no device ever holds the whole model."""
        init = jax.jit(self._init, out_shardings=self.shardings)
        return init(jax.random.PRNGKey(seed))

    def zero_sums(self) -> dict[str, jax.Array]:
        """The running sums the loop hands to its first train step (see `_train_step`)."""
        zero = jax.device_put(jnp.zeros((), jnp.float32), parallel.replicated(self.mesh))
        return {k: zero for k in ("loss", "top1_errors", "top5_errors", "count", "learning_rate")}

    def _images(self, batch: dict, consts: dict | None) -> jax.Array:
        """The model's input: the batch's images, normalised here when they are uint8 crops."""
        if not device_input.is_raw(batch):
            return batch["images"]
        if consts is None:
            raise ValueError("a batch of uint8 crops needs device_input.constants to normalise")
        return self.normalize({k: batch[k] for k in device_input.KEYS if k in batch}, consts)

    def _train_step(
        self,
        state: TrainState,
        batch: dict,
        totals: dict | None = None,
        consts: dict | None = None,
    ) -> tuple[TrainState, dict]:
        """One SGD step. Returns its metric sums and learning rate; given `totals` (the sums of
        earlier steps), the sums are added to them here rather than by a dispatch per metric.
        A batch of uint8 crops is normalised with `consts` (device_input.constants) first."""
        images, labels = self._images(batch, consts), batch["labels"]
        key = jax.random.fold_in(state.rng, state.step)
        masks = parallel.dropout_masks(key, self.model, images.shape[0], self.image_size, self.mesh)
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
        (_, sums), grads = grad_fn(state.params, images, labels, masks)
        lr = self.optimizer.schedule(state.step) * state.plateau.scale
        opt_state = set_learning_rate(state.opt_state, lr)
        updates, opt_state = self.optimizer.tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if totals is not None:
            sums = {k: totals[k] + v for k, v in sums.items()}
        return new, {**sums, "learning_rate": lr}

    def _eval_step(
        self, eval_fn: Callable, params: Any, batch: dict, consts: dict | None = None
    ) -> dict:
        """Metric sums of one eval batch (see `_train_step` for `consts`)."""
        return eval_fn(params, self._images(batch, consts), batch["labels"], batch["weights"])

    def input_constants(self, preprocess: input_pipeline.Preprocess) -> dict | None:
        """What the steps need to normalise `preprocess`'s uint8 batches, on every device."""
        if not preprocess.on_device:
            return None
        consts = device_input.constants(preprocess)
        return jax.device_put(consts, parallel.replicated(self.mesh))

    def evaluate(
        self,
        state: TrainState,
        batches: Iterable[dict],
        ten_crop: bool | None = None,
        prefix: str = "eval",
        consts: dict | None = None,
    ) -> dict[str, float]:
        """Means over every example of `batches` (rows of weight 0 are padding); `ten_crop`
        batches hold the ten patches of each image (default: as the config says)."""
        step = self.eval_step if ten_crop is None else self.eval_steps[ten_crop]
        sums = Accumulator(cluster.dispatch_depth(jax.default_backend()))
        for local in batches:
            sums.add(
                step(state.params, parallel.global_batch(self.mesh, local, self.batch_size), consts)
            )
        total = sums.pop()
        return {**means(total, prefix), f"{prefix}/count": int(total["count"])}


# -------------------------------------------------------------------------------------- loop


def num_train_steps(config: ml_collections.ConfigDict, train_size: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return config.num_epochs * train_size // config.batch_size


def create_source(
    config: ml_collections.ConfigDict, workdir: epath.Path | None = None, write: bool = True
) -> sources.Source:
    """The config's data, refused when its classes do not match the model's; without its
    undecodable images under input.skip_corrupt (the list cached in workdir)."""
    source = sources.create_source(config.input, jax.process_count())
    if config.input.get("skip_corrupt"):
        source = input_pipeline.skip_undecodable(source, workdir, write and _is_first())
    if source.num_classes != config.model.num_classes:
        raise UsageError(
            f"input.dataset={config.input.dataset!r} has {source.num_classes} classes but "
            f"model.num_classes={config.model.num_classes}: set --config.model.num_classes="
            f"{source.num_classes}."
        )
    return source


def _is_first() -> bool:
    return jax.process_index() == 0


def evaluate_and_log(
    trainer: Trainer,
    state: TrainState,
    step: int,
    source: sources.Source,
    preprocess: input_pipeline.Preprocess,
    writer: MetricsWriter,
    plateau: bool,
) -> tuple[TrainState, dict[str, float]]:
    """One pass over the eval split: log and write its metrics, and feed the plateau rule."""
    ds = input_pipeline.eval_dataset(
        source,
        preprocess,
        batch_size=trainer.batch_size,
        rows=trainer.rows,
        threads=trainer.input_threads,
    )
    consts = trainer.input_constants(preprocess)
    metrics = trainer.evaluate(state, input_pipeline.iterate(ds, source.eval), consts=consts)
    log_eval(step, metrics)
    writer.write(step, metrics)
    if plateau:
        value = jnp.float32(metrics["eval/top1_error"])
        state = state.replace(plateau=trainer.update_plateau(state.plateau, value))
    return state, metrics


EVAL_MODE_DIR = "eval_mode"  # --mode=eval writes its metrics.jsonl and TensorBoard events here


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, step: int | None = None
) -> dict[str, float]:
    """--mode=eval: the newest checkpoint (or `step`) on the eval split with the centre crop
    (eval/...) and with the paper's ten patches (eval_ten_crop/...). The model and the input
    statistics are the checkpoint's own; one line goes to workdir/eval_mode/metrics.jsonl; no
    checkpoint is written or changed, and no lock taken: it may run beside training."""
    config = resolve_batch_size(config, jax.device_count())
    workdir = cluster.workdir_path(workdir)
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.model)
    try:
        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        try:
            saved = ckpt.read(step, parallel.replicated(mesh))
        finally:
            ckpt.close()
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    config = config.copy_and_resolve_references()
    config.model = saved.config.model  # what was trained, whatever --config says
    check_config(config, jax.device_count(), jax.process_count())
    cluster.check_same_workdir(workdir)
    source = create_source(config, workdir, write=False)
    trainer = Trainer(config, mesh)
    params = jax.device_put(saved.state["params"], trainer.shardings.params)
    state = trainer.abstract_state.replace(params=params)  # evaluation reads only the params
    stats = input_pipeline.Stats.from_dict(saved.data["stats"], saved.mean_image)
    preprocess = input_pipeline.Preprocess.from_config(config.input, stats)
    logging.info("evaluating the checkpoint at step %d of %s", saved.step, workdir)
    metrics = {}
    for ten_crop, prefix in ((False, "eval"), (True, "eval_ten_crop")):
        ds = input_pipeline.eval_dataset(
            source,
            dataclasses.replace(preprocess, ten_crop=ten_crop),
            batch_size=trainer.batch_size,
            rows=trainer.rows,
            threads=trainer.input_threads,
        )
        batches = input_pipeline.iterate(ds, source.eval)
        consts = trainer.input_constants(preprocess)
        metrics |= trainer.evaluate(state, batches, ten_crop, prefix, consts)
        log_eval(saved.step, metrics, prefix)
    # Its own file: a training run may be appending to (and on resume trimming) metrics.jsonl.
    writer = MetricsWriter(workdir / EVAL_MODE_DIR, active=jax.process_index() == 0)
    writer.write(saved.step, metrics)
    return metrics


def checkpoint_stats(
    ckpt: checkpoint.Checkpointer, step: int, data_stats: input_pipeline.Stats
) -> input_pipeline.Stats:
    """The input statistics a resumed run normalises with: those its weights were trained
    with, saved in the checkpoint. They equal the data's, except for converted weights
    (convert_torchvision: torchvision's mean and std), which fine-tuning must keep."""
    saved = input_pipeline.Stats.from_dict(ckpt.data(step)["stats"])
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
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, float]:
    """Train (resuming from workdir's newest checkpoint) and return the final eval metrics.
    The run holds its workdir (lifecycle.WorkdirLock) and stops cleanly on SIGTERM/SIGINT."""
    config = resolve_batch_size(config, jax.device_count())
    check_config(config, jax.device_count(), jax.process_count())
    workdir = cluster.workdir_path(workdir)  # gs://... stays a URL
    workdir.mkdir(parents=True, exist_ok=True)
    lock = lifecycle.lock_workdir(workdir)
    try:
        with lifecycle.StopOnSignal() as stop:
            return _train_and_evaluate(config, workdir, stop)
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: epath.Path, stop: lifecycle.StopOnSignal
) -> dict:
    # Check everything, then restore (which refuses a checkpoint this run cannot resume),
    # before anything is written.
    pid = jax.process_index()
    cluster.check_same_workdir(workdir)
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.model)
    source = create_source(config, workdir)
    trainer = Trainer(config, mesh)
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    state = ckpt.restore(trainer.abstract_state)

    # Data: statistics (cached in workdir), preprocessing, the number of steps.
    i, B = config.input, config.batch_size
    stats = input_pipeline.get_stats(
        source, i.resize_size, i.stats_max_images, workdir, write=pid == 0
    )
    if state is not None:
        stats = checkpoint_stats(ckpt, int(jax.device_get(state.step)), stats)
    preprocess = input_pipeline.Preprocess.from_config(i, stats)
    data_meta = {"class_names": source.class_names, "stats": stats.to_dict()}
    total = num_train_steps(config, source.train.size)
    logging.info(
        "mesh %s on %d devices; %d train / %d eval examples; %d steps of %d",
        dict(mesh.shape),
        jax.device_count(),
        source.train.size,
        source.eval.size,
        total,
        B,
    )

    # State: fresh, or the restored one.
    if state is None:
        state = trainer.init_state(config.seed)
    else:
        logging.info("resumed from the checkpoint at step %d", int(state.step))
    start = int(jax.device_get(state.step))
    logging.info(
        "AlexNet (%s):\n%s",
        config.model.variant,
        layer_table(trainer.model, state.params, i.image_size),
    )
    eval_step = lambda step: step % config.eval_every_steps == 0 or step == total
    # A checkpoint is written before its step's evaluation (which may fail, e.g. on a bad
    # image), so a run resumed from one that was not evaluated evaluates it first: the plateau
    # rule then sees what the uninterrupted run saw.
    pending = start > 0 and eval_step(start) and not ckpt.evaluated(start)
    writer = MetricsWriter(workdir, active=pid == 0)
    dropped = writer.drop_after(start, evals_too=pending)
    if dropped:
        logging.info("dropped %d metrics.jsonl lines this run writes again", dropped)
    plateau = config.optimizer.schedule == "plateau"
    run_eval = lambda state, step: evaluate_and_log(
        trainer, state, step, source, preprocess, writer, plateau
    )
    save = lambda step, state, evaluated: ckpt.save(
        step, state, config, {**data_meta, "evaluated": evaluated}, stats.mean_image
    )

    # Train: log, evaluate and save on their cadences.
    ds = input_pipeline.train_dataset(
        source,
        preprocess,
        seed=config.seed,
        batch_size=B,
        start_step=start,
        num_steps=total,
        rows=trainer.rows,
        threads=trainer.input_threads,
    )
    batches = parallel.prefetch(mesh, input_pipeline.iterate(ds, source.train), B)
    consts = trainer.input_constants(preprocess)
    in_flight = InFlight(cluster.dispatch_depth(jax.default_backend()))
    sums, t_log, last_log, eval_metrics = trainer.zero_sums(), time.time(), start, {}
    waited = 0.0  # seconds the loop spent waiting for input since the last log line
    window, tracing = profile_window(config), False
    try:
        if pending or start >= total:
            if start >= total:
                logging.info("workdir already holds the final step %d; evaluating it", total)
            else:
                logging.info("evaluating step %d first: its checkpoint preceded that", start)
            state, eval_metrics = run_eval(state, start)
        for step in range(start + 1, total + 1):
            if window and step == window[0]:
                jax.profiler.start_trace(os.fspath(workdir / "profile"))
                tracing = True
            t = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t
            state, sums = trainer.train_step(state, batch, sums, consts)  # sums since the last log
            in_flight.add(sums)
            if tracing and step == window[1] - 1:
                jax.block_until_ready(sums)  # the trace holds the steps' device work
                jax.profiler.stop_trace()
                tracing = False
                logging.info("profile of steps %d-%d in %s", window[0], step, workdir / "profile")
            saving = step % config.checkpoint_every_steps == 0 or step == total
            logging_now = step % config.log_every_steps == 0 or step == total
            if saving or logging_now:
                stop_if_diverged(sums["loss"], step, ckpt)
            if logging_now:
                now = time.time()
                ips = (step - last_log) * B / (now - t_log)
                host = jax.device_get(sums)
                sums = trainer.zero_sums()
                line = {
                    **means(host, "train"),
                    "train/learning_rate": float(host["learning_rate"]),
                    "train/images_per_sec": ips,
                    "train/data_wait_fraction": waited / (now - t_log),
                }
                log_train(step, total, B, line)
                writer.write(step, line)
                t_log, last_log, waited = now, step, 0.0
            if saving:
                save(step, state, evaluated=False)
            if eval_step(step):
                state, eval_metrics = run_eval(state, step)
            if stop.should_stop(step) and step < total:
                if not saving:
                    stop_if_diverged(sums["loss"], step, ckpt)
                    save(step, state, evaluated=eval_step(step))
                ckpt.wait()
                message = (
                    f"stopped at step {step} of {total} ({stop.received}); its checkpoint is "
                    "saved. Run the same command to resume."
                )
                logging.warning(message)
                print(message, file=sys.stderr, flush=True)
                return eval_metrics
    finally:
        if tracing:
            jax.profiler.stop_trace()
        ckpt.close()  # waits until the saves begun are written, whatever stopped the loop
    return eval_metrics
