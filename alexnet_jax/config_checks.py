"""Every config error that can be seen before anything compiles, as a UsageError naming the fix;
and the global batch that per_device_batch_size implies.

Needs only JAX's stack: the device check (benchmarks/accelerator.py) runs these checks on GPU
images without TensorFlow. The choices of the input (MEANS, LOADERS) are named here, where
they are checked, and the input modules take them from here.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from alexnet_jax import parallel
from alexnet_jax.errors import UsageError
from alexnet_jax.model import AlexNet
from alexnet_jax.optimizer import Optimizer

MEANS = ("image", "channel")  # input.mean: the mean image's window (section 2), or per channel
LOADERS = ("tf.data", "dali")  # input.loader
DALI_INSTALL = 'pip install -e ".[dali]"'  # NVIDIA DALI for CUDA 12 (its CPU mode needs no GPU)


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def check_loader(loader: str, normalize_on_device: bool) -> None:
    """A UsageError unless `loader` can run: a known name, and DALI installed when asked for."""
    if loader not in LOADERS:
        raise UsageError(f"input.loader={loader!r} is unknown; use one of {LOADERS}.")
    if loader != "dali":
        return
    if not normalize_on_device:
        raise UsageError(
            "input.loader=dali ships uint8 crops that the device normalises: set "
            "--config.input.normalize_on_device=True."
        )
    if not dali_available():
        raise UsageError(
            f"input.loader=dali needs NVIDIA DALI, which is not installed: {DALI_INSTALL}"
        )


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
    check_loader(i.get("loader", "tf.data"), i.normalize_on_device)
    need(i.mean in MEANS, f"input.mean={i.mean!r} is unknown; use one of {MEANS}.")
    need(
        i.stats_max_images >= 1,
        f"input.stats_max_images={i.stats_max_images}: the mean and PCA need at least 1 image.",
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
    need(
        config.keep_checkpoints > 0,
        f"keep_checkpoints={config.keep_checkpoints} would keep no checkpoint, so a stopped run "
        "could not resume: keep at least 1 (the newest).",
    )
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
