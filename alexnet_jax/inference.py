"""A trained run in a notebook: `load_checkpoint` restores it onto one device, whatever mesh
trained it, and `predict` classifies uint8 images with the run's own eval preprocessing."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from alexnet_jax import checkpoint, transforms
from alexnet_jax.errors import UsageError
from alexnet_jax.model import AlexNet


@dataclasses.dataclass
class Restored:
    """What `load_checkpoint` returns; `predict` maps uint8 NHWC images to class probabilities."""

    model: AlexNet
    params: Any
    config: ml_collections.ConfigDict
    step: int
    class_names: list[str]
    preprocess: transforms.Preprocess  # the run's eval transform, centre crop

    @functools.cached_property
    def _probabilities(self) -> Any:
        return jax.jit(lambda p, x: jax.nn.softmax(self.model.apply({"params": p}, x)))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W, 3 or 1] (or one [H, W, C]) uint8 images of any size -> [N, classes]."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UsageError(f"predict wants uint8 images [N, H, W, 3], got {images.shape}.")
        if images.dtype != np.uint8:  # 0-1 floats read as 0-255 would be all but black
            raise UsageError(
                f"predict wants uint8 images (0-255), got {images.dtype}; convert images in "
                "0-1 with (x * 255).round().astype(np.uint8)."
            )
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        batch = np.stack(
            [transforms.eval_preprocess(im, self.preprocess)["images"].numpy() for im in images]
        )
        probs = np.asarray(self._probabilities(self.params, batch))
        if not np.all(np.isfinite(probs)):
            raise UsageError(
                f"The parameters of step {self.step} give non-finite outputs: that run diverged. "
                "Restore an earlier step (load_checkpoint(DIR, step=N))."
            )
        return probs


def load_checkpoint(
    workdir: str | os.PathLike, step: int | None = None, device: jax.Device | None = None
) -> Restored:
    """Restore a run's parameters onto one device (default: the first), whatever mesh wrote them."""
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        saved = ckpt.read(step, sharding)
    finally:
        ckpt.close()
    stats = transforms.Stats.from_dict(saved.data["stats"], saved.mean_image)
    preprocess = transforms.Preprocess.from_config(saved.config.input, stats)
    return Restored(
        model=AlexNet.from_config(saved.config.model),
        params=saved.state["params"],
        config=saved.config,
        step=saved.step,
        class_names=list(saved.data["class_names"]),
        preprocess=dataclasses.replace(preprocess, ten_crop=False, on_device=False),
    )
