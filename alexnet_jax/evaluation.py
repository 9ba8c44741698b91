"""Evaluation: one pass over the eval split (the run's periodic evaluations and --mode=eval),
and what a run and an evaluation both need: the config's data, and this process's share of
every global batch."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from alexnet_jax import (
    checkpoint,
    cluster,
    lifecycle,
    loaders,
    parallel,
    skiplist,
    sources,
    transforms,
)
from alexnet_jax.config_checks import check_config, resolve_batch_size
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import MetricsWriter, log_eval
from alexnet_jax.steps import Trainer, TrainState


def open_source(config: ml_collections.ConfigDict) -> sources.Source:
    """The config's data, refused when its classes do not match the model's; writes nothing."""
    source = sources.create_source(config.input, jax.process_count())
    if source.num_classes != config.model.num_classes:
        raise UsageError(
            f"input.dataset={config.input.dataset!r} has {source.num_classes} classes but "
            f"model.num_classes={config.model.num_classes}: set --config.model.num_classes="
            f"{source.num_classes}."
        )
    return source


def skip_corrupt(
    config: ml_collections.ConfigDict,
    source: sources.Source,
    workdir: epath.Path | None,
    write: bool = True,
) -> sources.Source:
    """`source` without its undecodable images under input.skip_corrupt (the list cached in
    workdir), else `source`."""
    if not config.input.get("skip_corrupt"):
        return source
    return skiplist.skip_undecodable(source, workdir, write and is_first())


def is_first() -> bool:
    return jax.process_index() == 0


def host_input(trainer: Trainer) -> dict[str, Any]:
    """How this process reads its share of every global batch: the batch, the rows of it that
    its devices hold (parallel.process_rows), and the host cores it reads them on."""
    rows = parallel.process_rows(trainer.mesh, trainer.batch_size)
    return {
        "batch_size": trainer.batch_size,
        "rows": rows,
        "threads": cluster.input_threads(os.environ),
    }


def evaluate(
    trainer: Trainer,
    state: TrainState,
    step: int,
    source: sources.Source,
    preprocess: transforms.Preprocess,
    prefix: str = "eval",
) -> dict[str, float]:
    """One pass over the eval split with `preprocess`'s centre crop (or its ten patches):
    the metrics under `prefix`, logged. Training and --mode=eval both evaluate here."""
    batches = loaders.eval_batches(source, preprocess, **host_input(trainer))
    consts = trainer.input_constants(transforms.device_constants(preprocess))
    metrics = trainer.evaluate(state, batches, preprocess.ten_crop, prefix, consts)
    log_eval(step, metrics, prefix)
    if not math.isfinite(metrics[f"{prefix}/loss"]):
        raise UsageError(
            f"The evaluation loss of step {step} is {metrics[f'{prefix}/loss']}: the parameters "
            "of that step are not usable. If training led there, lower "
            "--config.optimizer.learning_rate (or check the optimizer's settings) and resume "
            "from an earlier checkpoint by moving that step's directory out of checkpoints/; "
            "nothing was deleted."
        )
    return metrics


EVAL_MODE_DIR = "eval_mode"  # --mode=eval writes its metrics.jsonl and TensorBoard events here


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, step: int | None = None
) -> dict[str, float]:
    """--mode=eval: the newest checkpoint (or `step`) on the eval split with the centre crop
    (eval/...) and with the paper's ten patches (eval_ten_crop/...). The model and the input
    statistics are the checkpoint's own; one line goes to workdir/eval_mode/metrics.jsonl; no
    checkpoint is written or changed, and no lock taken: it may run beside training."""
    config = resolve_batch_size(config, jax.device_count())
    workdir = lifecycle.workdir_path(workdir)
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.model)
    try:
        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        try:
            saved = ckpt.read(step, parallel.replicated(mesh))
        finally:
            ckpt.close()
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if is_first():  # before computing what it would then fail to write
        lifecycle.writable_dir(workdir / EVAL_MODE_DIR)
    config = config.copy_and_resolve_references()
    config.model = saved.config.model  # what was trained, whatever --config says
    check_config(config, jax.device_count(), jax.process_count())
    lifecycle.check_same_workdir(workdir)
    source = skip_corrupt(config, open_source(config), workdir, write=False)
    trainer = Trainer(config, mesh)
    params = jax.device_put(saved.state["params"], trainer.shardings.params)
    state = trainer.abstract_state.replace(params=params)  # evaluation reads only the params
    stats = transforms.Stats.from_dict(saved.data["stats"], saved.mean_image)
    preprocess = transforms.Preprocess.from_config(config.input, stats)
    logging.info("evaluating the checkpoint at step %d of %s", saved.step, workdir)
    metrics = {}
    for ten_crop, prefix in ((False, "eval"), (True, "eval_ten_crop")):
        p = dataclasses.replace(preprocess, ten_crop=ten_crop)
        metrics |= evaluate(trainer, state, saved.step, source, p, prefix)
    # Its own file: a training run may be appending to (and on resume trimming) metrics.jsonl.
    writer = MetricsWriter(workdir / EVAL_MODE_DIR, active=is_first())
    writer.write(saved.step, metrics)
    return metrics
