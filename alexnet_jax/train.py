"""Train state, the paper's SGD, learning-rate schedules, train/eval steps and the training loop."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tensorflow as tf
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import checkpoint, input_pipeline, parallel, sources
from alexnet_jax.errors import UsageError
from alexnet_jax.model import VARIANTS, AlexNet, feature_shapes, min_image_size, param_count

SCHEDULES = ("plateau", "step", "constant")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array  # base key; step s uses fold_in(rng, s)
    plateau: Any  # reduce_on_plateau state, updated only after evaluations


def build_model(config: ml_collections.ConfigDict) -> AlexNet:
    m = config.model
    return AlexNet(
        variant=m.variant,
        num_classes=m.num_classes,
        towers=m.towers,
        width=m.width,
        activation=m.activation,
        lrn=m.lrn,
        overlap_pool=m.overlap_pool,
        dropout_rate=m.dropout_rate,
        dtype=DTYPES[m.dtype],
        weight_init=m.weight_init,
    )


def check_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
    """Every config error we can see before compiling, as a UsageError naming the fix."""
    m, i, o = config.model, config.input, config.optimizer

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    need(m.variant in VARIANTS, f"model.variant={m.variant!r} is unknown; use one of {VARIANTS}.")
    need(m.towers in (1, 2), f"model.towers={m.towers} must be 1 or 2.")
    need(m.variant == "paper" or m.towers == 1, "model.variant='owt' has no towers: towers=1.")
    need(m.width > 0, f"model.width={m.width} must be positive.")
    need(m.num_classes > 0, f"model.num_classes={m.num_classes} must be positive.")
    need(m.activation in ("relu", "tanh"), f"model.activation={m.activation!r}: relu or tanh.")
    need(m.dtype in DTYPES, f"model.dtype={m.dtype!r} is unknown; use one of {tuple(DTYPES)}.")
    need(m.weight_init in ("paper", "he"), f"model.weight_init={m.weight_init!r}: paper or he.")
    need(0 <= m.dropout_rate < 1, f"model.dropout_rate={m.dropout_rate} must be in [0, 1).")
    need(
        i.dataset in sources.DATASETS,
        f"input.dataset={i.dataset!r} is unknown; use one of {sources.DATASETS}.",
    )
    smallest = min_image_size(m.variant, m.overlap_pool)
    need(
        i.image_size >= smallest,
        f"input.image_size={i.image_size} is too small for the {m.variant} architecture: its "
        f"last pooling would have no output. Use at least {smallest}.",
    )
    need(
        i.resize_size >= i.image_size,
        f"input.resize_size={i.resize_size} must be at least input.image_size={i.image_size}.",
    )
    need(config.batch_size > 0, f"batch_size={config.batch_size} must be positive.")
    need(
        config.num_train_steps > 0 or config.num_epochs > 0,
        "Set num_train_steps > 0, or num_train_steps=-1 and num_epochs > 0.",
    )
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        need(config[key] > 0, f"{key}={config[key]} must be positive.")
    need(o.schedule in SCHEDULES, f"optimizer.schedule={o.schedule!r}: one of {SCHEDULES}.")
    need(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be positive.")
    parallel.check_mesh(
        config.mesh.data, config.mesh.model, m.towers, config.batch_size, num_devices, process_count
    )


# ---------------------------------------------------------------------------------- optimizer


def make_optimizer(o: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """v <- momentum * v - lr * (g + wd * w); w <- w + v: the rate inside the velocity, as the
    paper writes it (optax.sgd would scale after the momentum)."""
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: o.decay_biases or path[-1].key == "kernel", params
    )
    return optax.chain(
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
        optax.inject_hyperparams(optax.scale)(step_size=-o.learning_rate),
        optax.trace(decay=o.momentum),
    )


def make_plateau(o: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    return optax.contrib.reduce_on_plateau(
        factor=o.plateau_factor, patience=o.plateau_patience, min_scale=o.plateau_min_scale
    )


def make_schedule(o: ml_collections.ConfigDict) -> optax.Schedule:
    """The base rate per step; 'plateau' multiplies it by the plateau state's scale."""
    if o.schedule == "step":
        return optax.exponential_decay(
            o.learning_rate, o.step_every_steps, o.step_factor, staircase=True
        )
    return optax.constant_schedule(o.learning_rate)


def _set_learning_rate(opt_state: Any, lr: jax.Array) -> Any:
    decay, scale, trace = opt_state
    hyper = dict(scale.hyperparams, step_size=-lr.astype(scale.hyperparams["step_size"].dtype))
    return (decay, scale._replace(hyperparams=hyper), trace)


# ------------------------------------------------------------------------------------- steps


def wait_for(previous_step_output: Any) -> None:
    """Keep at most two steps dispatched: the host runs one step ahead of the devices, and no
    more. Unbounded async dispatch deadlocked XLA's CPU collectives (seen: 7 of 8 simulated
    devices waiting forever in an all-reduce rendezvous), and buys nothing on accelerators."""
    if previous_step_output is not None:
        jax.block_until_ready(previous_step_output)


class Trainer:
    """The jitted pieces of one run, built once for a config and a mesh."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        c = config
        self.model = build_model(c)
        self.tx = make_optimizer(c.optimizer)
        self.plateau = make_plateau(c.optimizer)
        self.schedule = make_schedule(c.optimizer)
        self.image_size = c.input.image_size
        self.abstract_state = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        specs = parallel.param_specs(self.model, self.abstract_state.params, self.mesh)
        self.shardings = parallel.state_shardings(self.tx, self.abstract_state, specs, self.mesh)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.shardings,
        )
        replicated = NamedSharding(self.mesh, P())
        params = self.abstract_state.params
        self.loss_fn = parallel.make_loss_fn(self.model, params, self.mesh)
        self.eval_fn = parallel.make_eval_fn(self.model, params, self.mesh, c.input.eval_ten_crop)
        self.train_step = jax.jit(
            self._train_step, donate_argnums=0, out_shardings=(self.shardings, replicated)
        )
        self.eval_step = jax.jit(self.eval_fn, out_shardings=replicated)
        self.update_plateau = jax.jit(
            lambda p, v: self.plateau.update(updates={}, state=p, value=v)[1],
            out_shardings=self.shardings.plateau,
        )
        self.trace_count = 0

    def _init(self, key: jax.Array) -> TrainState:
        params = self.model.init(
            key, jnp.zeros((1, self.image_size, self.image_size, 3)), train=False
        )["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=jax.random.fold_in(key, 1),
            plateau=self.plateau.init(params),
        )

    def init_state(self, seed: int) -> TrainState:
        """Initialise directly into the shardings: no device ever holds the whole model."""
        init = jax.jit(self._init, out_shardings=self.shardings)
        return init(jax.random.PRNGKey(seed))

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        self.trace_count += 1  # Python side effect: runs once per trace
        images, labels = batch["images"], batch["labels"]
        key = jax.random.fold_in(state.rng, state.step)
        masks = parallel.dropout_masks(key, self.model, images.shape[0], self.image_size, self.mesh)
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
        (_, sums), grads = grad_fn(state.params, images, labels, masks)
        lr = self.schedule(state.step) * state.plateau.scale
        opt_state = _set_learning_rate(state.opt_state, lr)
        updates, opt_state = self.tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, {**sums, "learning_rate": lr}

    def evaluate(self, state: TrainState, batches: Any) -> dict[str, float]:
        total, previous = None, None
        for local in batches:
            b = parallel.global_batch(self.mesh, local)
            sums = self.eval_step(state.params, b["images"], b["labels"], b["weights"])
            wait_for(previous)
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
            previous = sums
        total = jax.device_get(total)
        n = max(float(total["count"]), 1.0)
        return {
            "eval/loss": float(total["loss"]) / n,
            "eval/top1_error": float(total["top1_errors"]) / n,
            "eval/top5_error": float(total["top5_errors"]) / n,
            "eval/count": int(total["count"]),
        }


# ----------------------------------------------------------------------------------- logging


class MetricsWriter:
    """metrics.jsonl and TensorBoard events in workdir; silent on every process but 0."""

    def __init__(self, workdir: str, active: bool):
        self.active = active
        if active:
            self.path = Path(workdir) / "metrics.jsonl"
            self.tb = tf.summary.create_file_writer(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        with self.tb.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(k, v)
        self.tb.flush()


def layer_table(model: AlexNet, params: Any, image_size: int) -> str:
    shapes = dict(
        feature_shapes(model.variant, image_size, model.width, model.num_towers, model.overlap_pool)
    )
    rows = [("layer", "output", "parameters")]
    for name, layer in params.items():
        out = shapes.get(name)
        rows.append(
            (
                name,
                "x".join(map(str, out)) if out else str(layer["kernel"].shape[-1]),
                f"{param_count(layer):,}",
            )
        )
        if f"{name}_pool" in shapes:
            rows.append((f"  {name} pool", "x".join(map(str, shapes[f"{name}_pool"])), ""))
    rows.append(("total", "", f"{param_count(params):,}"))
    return "\n".join(f"{a:<12} {b:>12} {c:>14}" for a, b, c in rows)


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


# -------------------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (resuming from workdir's newest checkpoint) and return the final eval metrics."""
    pid, nproc = jax.process_index(), jax.process_count()
    check_config(config, jax.device_count(), nproc)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.model)
    source = sources.create_source(config.input)
    if source.num_classes != config.model.num_classes:
        raise UsageError(
            f"input.dataset={config.input.dataset!r} has {source.num_classes} classes but "
            f"model.num_classes={config.model.num_classes}: set --config.model.num_classes="
            f"{source.num_classes}."
        )
    trainer = Trainer(config, mesh)
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    # Restore (which refuses a mismatched checkpoint) before anything is written.
    state = ckpt.restore(trainer.abstract_state)
    stats = input_pipeline.get_stats(source, config.input, workdir, write=pid == 0)
    data_meta = {"class_names": source.class_names, "stats": dataclasses.asdict(stats)}
    B = config.batch_size
    total = config.num_train_steps
    if total <= 0:
        total = config.num_epochs * source.train.size // B
    logging.info(
        "mesh %s on %d devices; %d train / %d eval examples; %d steps of %d",
        dict(mesh.shape),
        jax.device_count(),
        source.train.size,
        source.eval.size,
        total,
        B,
    )

    if state is None:
        state = trainer.init_state(config.seed)
    else:
        logging.info("resumed from the checkpoint at step %d", int(state.step))
    start = int(jax.device_get(state.step))
    logging.info(
        "AlexNet (%s):\n%s",
        config.model.variant,
        layer_table(trainer.model, state.params, config.input.image_size),
    )
    writer = MetricsWriter(workdir, active=pid == 0)

    def run_eval(state: TrainState, step: int) -> tuple[TrainState, dict]:
        ds = input_pipeline.eval_dataset(
            source, config.input, stats, batch_size=B, process_index=pid, process_count=nproc
        )
        metrics = trainer.evaluate(state, input_pipeline.iterate(ds, source.eval))
        logging.info(
            "eval step %d: loss %.4f, top-1 error %.4f, top-5 error %.4f (%d images)",
            step,
            metrics["eval/loss"],
            metrics["eval/top1_error"],
            metrics["eval/top5_error"],
            metrics["eval/count"],
        )
        writer.write(step, metrics)
        if config.optimizer.schedule == "plateau":
            value = jnp.float32(metrics["eval/top1_error"])
            state = state.replace(plateau=trainer.update_plateau(state.plateau, value))
        return state, metrics

    ds = input_pipeline.train_dataset(
        source,
        config.input,
        stats,
        seed=config.seed,
        batch_size=B,
        start_step=start,
        num_steps=total,
        process_index=pid,
        process_count=nproc,
    )
    batches = input_pipeline.iterate(ds, source.train)
    pending, t_log, last_log, eval_metrics = None, time.time(), start, {}
    previous = None
    for step in range(start + 1, total + 1):
        state, m = trainer.train_step(state, parallel.global_batch(mesh, next(batches)))
        wait_for(previous)
        previous = m
        pending = m if pending is None else jax.tree.map(jnp.add, pending, m)
        saving = step % config.checkpoint_every_steps == 0 or step == total
        # pending sums every step since the last log, so one NaN anywhere shows here.
        if (saving or step % config.log_every_steps == 0) and not jnp.isfinite(pending["loss"]):
            last = ckpt.latest_step()
            raise UsageError(
                f"The training loss became NaN or infinite by step {step}. Lower "
                "--config.optimizer.learning_rate (or check the input scale); the newest "
                f"checkpoint ({'step ' + str(last) if last is not None else 'none'}) is intact."
            )
        if step % config.log_every_steps == 0 or step == total:
            p, now = jax.device_get(pending), time.time()
            n, ips = float(p["count"]), (step - last_log) * B / (now - t_log)
            line = {
                "train/loss": float(p["loss"]) / n,
                "train/top1_error": float(p["top1_errors"]) / n,
                "train/top5_error": float(p["top5_errors"]) / n,
                "train/learning_rate": float(m["learning_rate"]),
                "train/images_per_sec": ips,
            }
            logging.info(
                "step %d/%d: loss %.4f, top-1 error %.4f, top-5 error %.4f, lr %.2e, "
                "%.1f images/s, ETA %s",
                step,
                total,
                line["train/loss"],
                line["train/top1_error"],
                line["train/top5_error"],
                line["train/learning_rate"],
                ips,
                _fmt_eta((total - step) * B / ips),
            )
            writer.write(step, line)
            pending, t_log, last_log = None, now, step
        if step % config.eval_every_steps == 0 or step == total:
            state, eval_metrics = run_eval(state, step)
        if saving:
            ckpt.save(step, state, config, data_meta)
    if start >= total:
        logging.info("workdir already holds the final step %d; evaluating it", total)
        state, eval_metrics = run_eval(state, total)
    ckpt.close()
    return eval_metrics
