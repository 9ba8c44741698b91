"""The end of the input transform, on the device: uint8 crops to the model's float32 input.

With input.normalize_on_device the host ships each crop as uint8 (4x fewer bytes than float32)
with where it was taken and whether to mirror it (top, left, mirror: 3 int32) and, in
training, its PCA lighting shift (3 float32). Inside the jitted step this module adds the
shift, subtracts the mean (the window of the mean image under the crop, or the channel mean),
divides by the std and mirrors the flagged crops: transforms.normalize's arithmetic, which
the tests hold it to. Mirroring here costs the device nothing (XLA fuses the reversal into
the arithmetic) and spares the host a copy of every mirrored crop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alexnet_jax.batch import Batch


def normalize(batch: Batch, consts: dict[str, jax.Array]) -> jax.Array:
    """float32 images [..., H, W, 3] from a uint8 batch (batch.raw): its `images`, `crops`
    [..., 3] and, if present, lighting `shifts` [..., 3]."""
    images, crops = batch.images, batch.crops
    x = images.astype(jnp.float32)
    if batch.shifts is not None:
        x = x + batch.shifts[..., None, None, :]
    per_channel = (1,) * (x.ndim - 1) + (3,)
    mean = consts["mean"]
    if mean.ndim == 3:  # the mean image: each crop's own window
        h, w = images.shape[-3:-1]
        window = lambda c: jax.lax.dynamic_slice(mean, (c[0], c[1], 0), (h, w, 3))
        mean = jax.vmap(window)(crops.reshape(-1, 3)).reshape(images.shape)
    else:
        mean = mean.reshape(per_channel)
    x = (x - mean) / consts["std"].reshape(per_channel)
    return jnp.where(crops[..., 2, None, None, None] > 0, x[..., ::-1, :], x)
