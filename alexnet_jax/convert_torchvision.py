"""torchvision's AlexNet weights as step 0 of a configs/owt.py run.

    pip install -e ".[torch]"
    python -m alexnet_jax.convert_torchvision --pth=alexnet-owt-7be5be79.pth --workdir=DIR

The checkpoint carries what the weights expect of their input (torchvision's per-channel mean
and std, 224 crops of the central 256 square) and ImageNet's class names, so `load_checkpoint`,
`python -m alexnet_jax.predict`, `launch.py --mode=eval` and fine-tuning with `launch.py
--config=configs/owt.py --workdir=DIR` (a fresh optimizer state) use it as it is.

The layout conversion (`from_torch`) is plain NumPy and serves both variants: conv kernels
OIHW -> HWIO (torch's grouped kernels are already this project's grouped layout), dense kernels
transposed, and fc6's input rows reordered from torch's C,H,W flatten to this model's H,W,C.
(benchmarks/torch_alexnet.py has the way back.)
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from alexnet_jax.errors import UsageError

# torchvision's ImageNet normalisation, RGB in 0-1 (torchvision.transforms.Normalize).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
DENSES = ("fc6", "fc7", "fc8")
OWT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "owt.py"


def layer_keys(keys: Any) -> dict[str, str]:
    """{'conv1': 'features.0', ..., 'fc8': 'classifier.6'}: the layers of a torch AlexNet state
    dict, in order (torchvision's indices, or any other Sequential's)."""
    found = {}
    for part, names in (("features", CONVS), ("classifier", DENSES)):
        idx = sorted(
            int(m.group(1)) for k in keys if (m := re.fullmatch(rf"{part}\.(\d+)\.weight", k))
        )
        if len(idx) != len(names):
            raise UsageError(
                f"expected {len(names)} weighted layers under '{part}.' as torchvision's AlexNet "
                f"has, found {len(idx)} ({[f'{part}.{i}' for i in idx]})."
            )
        found.update({name: f"{part}.{i}" for name, i in zip(names, idx, strict=True)})
    return found


def fc6_rows(kernel_in_out: np.ndarray, channels: int, src: str, dst: str) -> np.ndarray:
    """fc6's rows (its input features) from one flatten order ('chw' or 'hwc') to the other."""
    n, out = kernel_in_out.shape
    side = int(round((n // channels) ** 0.5))
    if side * side * channels != n:
        raise UsageError(f"fc6 has {n} inputs, not a square map of {channels} channels.")
    dims = {"c": channels, "h": side, "w": side}
    grid = kernel_in_out.reshape(*(dims[a] for a in src), out)
    order = [src.index(a) for a in dst] + [3]
    return grid.transpose(order).reshape(n, out)


def from_torch(state_dict: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """This project's parameter tree (float32 NumPy) from a torch AlexNet state dict."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    keys = layer_keys(sd)

    def get(key: str) -> np.ndarray:
        if key not in sd:
            raise UsageError(f"the state dict has {key.rsplit('.', 1)[0]}.weight but no {key}.")
        return sd[key]

    params = {}
    for name in CONVS:
        w = get(keys[name] + ".weight")
        if w.ndim != 4:
            raise UsageError(f"{keys[name]}.weight has shape {w.shape}; a conv kernel is OIHW.")
        params[name] = {"kernel": w.transpose(2, 3, 1, 0), "bias": get(keys[name] + ".bias")}
    for name in DENSES:
        w = get(keys[name] + ".weight")
        params[name] = {"kernel": w.T, "bias": get(keys[name] + ".bias")}
    conv5_channels = params["conv5"]["kernel"].shape[-1]
    params["fc6"]["kernel"] = fc6_rows(params["fc6"]["kernel"], conv5_channels, "chw", "hwc")
    return params


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torchvision AlexNet state dict from a `.pth` file (also one saved as {'state_dict':
    ...} or {'model': ...}, or by DataParallel with 'module.' prefixes)."""
    try:
        import torch
    except ImportError:
        raise UsageError(
            'reading a .pth file needs PyTorch: pip install -e ".[torch]" (CPU is enough).'
        ) from None
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged or foreign files
        first = (str(e).splitlines() or [""])[0][:200]
        raise UsageError(
            f"{path} is not a readable PyTorch file ({type(e).__name__}: {first})."
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise UsageError(f"{path} holds no state dict of tensors (got {type(obj).__name__}).")
    return {k.removeprefix("module."): v.detach().float().numpy() for k, v in obj.items()}


def torchvision_stats() -> Any:
    """Input statistics with torchvision's mean and std (0-255 units); the PCA lighting of
    paper section 4.1, used when fine-tuning, keeps ImageNet's eigen-decomposition."""
    from alexnet_jax import transforms

    return transforms.Stats(
        mean=tuple(255.0 * m for m in TORCHVISION_MEAN),
        eigval=transforms.IMAGENET_STATS.eigval,
        eigvec=transforms.IMAGENET_STATS.eigvec,
        channel_std=tuple(255.0 * s for s in TORCHVISION_STD),
    )


def torchvision_config(config: Any) -> Any:
    """`config` (owt's) with the input that torchvision's weights were trained on."""
    config = config.copy_and_resolve_references()
    config.input.mean = "channel"
    config.input.divide_by_std = True
    config.input.resize_size = 256
    config.input.image_size = 224
    return config


def convert(state_dict: Mapping[str, Any], workdir: str | os.PathLike, config: Any) -> None:
    """Write `state_dict` as step 0 of a run of `config` (owt) in workdir. Refuses weights that
    do not fit the config's model, and a workdir that holds checkpoints."""
    import jax

    from alexnet_jax import checkpoint, config_checks, lifecycle, parallel, sources, steps

    config = torchvision_config(config)
    params = from_torch(state_dict)
    mesh = parallel.create_mesh(1, 1)  # one device: the saved layout fits any mesh
    config.mesh.data, config.mesh.model = 1, 1
    config_checks.check_config(config, 1, 1)
    trainer = steps.Trainer(config, mesh)
    saved, wanted = (checkpoint.flat_shapes(t) for t in (params, trainer.abstract_state.params))
    lines = checkpoint.describe_mismatch(saved, wanted, ("weights", "model"))
    if lines:
        raise UsageError(
            f"these weights do not fit the config's {config.model.variant} model:\n"
            + "\n".join(lines)
            + "\nThe converter expects torchvision's AlexNet (configs/owt.py: 1,000 classes, "
            "224x224 input)."
        )
    workdir = lifecycle.workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = lifecycle.lock_workdir(workdir)
    try:
        ckpt = checkpoint.Checkpointer(workdir)
        try:
            if ckpt.latest_step() is not None:
                raise UsageError(
                    f"{workdir} already holds checkpoints (steps {ckpt.manager.all_steps()}): "
                    "give a new --workdir. Nothing was changed."
                )
            state = trainer.init_state(config.seed)  # a fresh optimizer state and rng
            state = state.replace(params=jax.device_put(params, trainer.shardings.params))
            data = {
                "class_names": sources.imagenet_class_names(),
                "stats": torchvision_stats().to_dict(),
                "evaluated": True,
                "converted_from": "torchvision",
            }
            ckpt.save(0, state, config, data)
        finally:
            ckpt.close()
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str]) -> None:
    from absl import app, flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.pth or not FLAGS.workdir:
        raise app.UsageError("give --pth=FILE (torchvision's alexnet .pth) and --workdir=DIR")
    try:
        convert(read_pth(FLAGS.pth), FLAGS.workdir, FLAGS.config)
    except UsageError as e:
        print(f"convert_torchvision: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"wrote {FLAGS.pth} as step 0 of {FLAGS.workdir}; evaluate with "
        f"`python launch.py --config=configs/owt.py --workdir={FLAGS.workdir} --mode=eval "
        "--config.input.data_dir=...`"
    )


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    # Defined here, not on import: the functions above are also used inside other programs.
    flags.DEFINE_string("pth", None, "torchvision's AlexNet state dict (.pth).")
    flags.DEFINE_string("workdir", None, "Where to write the checkpoint (a new directory).")
    config_flags.DEFINE_config_file(
        "config", str(OWT_CONFIG), "The run's config (owt); --config.KEY=VALUE overrides."
    )
    app.run(main)
