"""The batch: what every loader yields, parallel.global_batch places on the mesh and the steps
take. B is the batch (a process's rows on the host; the global batch on the devices), S the
crop side (input.image_size); eval batches of the paper's ten patches hold [B, 10, ...] where
these say [B, ...].

Two forms. Normalised on the host: `images` float32, `crops` and `shifts` None. Uint8
(input.normalize_on_device): `images` uint8 with `crops` saying where each was cut and whether
to mirror it, and in training `shifts` its PCA lighting; device_input.normalize turns them
into the normalised float32 images inside the jitted step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

Array = Any  # np.ndarray on the host, jax.Array on the devices


class Batch(NamedTuple):
    """A batch of examples as named arrays (NumPy on the host, jax.Array on the devices); a
    pytree, so jit, shard_map and device_put take it whole."""

    images: Array  # [B, S, S, 3]: float32 normalised, or uint8 crops
    labels: Array  # [B] int32 class indices
    weights: Array = None  # [B] float32, eval batches: 1 for an example, 0 for padding rows
    crops: Array = None  # [B, 3] int32 (top, left, mirror) of each uint8 crop; None if float32
    shifts: Array = None  # [B, 3] float32 PCA lighting of uint8 train crops (0-255 units)

    @property
    def raw(self) -> bool:
        """Whether `images` are uint8 crops that device_input.normalize turns into the input."""
        return self.crops is not None

    @property
    def size(self) -> int:
        """The number of rows (padding included)."""
        return len(self.labels)
