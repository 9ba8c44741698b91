"""The paper's transforms of an image (section 4.1), as pure functions of their arguments: the
input statistics they use, the central square at the resize size, the train crop with its
mirror and PCA lighting drawn for the global batch from (seed, step), normalisation, and the
eval windows (the centre, or the ten patches). TensorFlow ops, run by input_pipeline's streams;
device_input.py is `normalize` again on the device, and DALI cuts the same windows.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import tensorflow as tf

from alexnet_jax.config_checks import MEANS
from alexnet_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Stats:
    """Per-channel RGB mean (0-255), eigen-decomposition of the RGB covariance (RGB in 0-1) and,
    where it was computed, the training set's mean image (0-255, the resize size square)."""

    mean: tuple[float, float, float]
    eigval: tuple[float, float, float]
    eigvec: tuple[tuple[float, ...], ...]  # columns are the eigenvectors
    mean_image: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    # Per-channel std (0-255) where weights were trained with given constants (torchvision's);
    # None: the covariance's.
    channel_std: tuple[float, float, float] | None = None

    def std(self) -> np.ndarray:
        """Per-channel standard deviation (0-255): `channel_std`, else the diagonal of
        V diag(lambda) V^T."""
        if self.channel_std is not None:
            return np.asarray(self.channel_std, np.float64)
        v = np.asarray(self.eigvec)
        return 255.0 * np.sqrt((v * v) @ np.asarray(self.eigval))

    def to_dict(self) -> dict:
        """The JSON-able part (the mean image is stored as an array beside it)."""
        d = {"mean": self.mean, "eigval": self.eigval, "eigvec": self.eigvec}
        return d if self.channel_std is None else {**d, "std": self.channel_std}

    @classmethod
    def from_dict(cls, d: dict, mean_image: np.ndarray | None = None) -> Stats:
        eigvec = tuple(tuple(r) for r in d["eigvec"])
        std = tuple(d["std"]) if d.get("std") is not None else None
        return cls(tuple(d["mean"]), tuple(d["eigval"]), eigvec, mean_image, std)


# Paper section 4.1 uses ImageNet's own statistics; these are the widely used values.
IMAGENET_STATS = Stats(
    mean=(123.675, 116.28, 103.53),
    eigval=(0.2175, 0.0188, 0.0045),
    eigvec=(
        (-0.5675, 0.7192, 0.4009),
        (-0.5808, -0.0045, -0.8140),
        (-0.5836, -0.6948, 0.4203),
    ),
)


def resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """A uint8 image's shorter side to `size` (antialiased), then the central size x size
    square, rounded to uint8; an image already of that size (data stored as the paper stored
    it) is left as it is."""
    already = tf.reduce_all(tf.shape(image)[:2] == size)
    return tf.cond(already, lambda: image, lambda: _resize_square(image, size))


def _resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    image = tf.image.resize(tf.cast(image, tf.float32), new, antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    square = tf.slice(image, [top, left, 0], [size, size, 3])
    return tf.cast(tf.clip_by_value(tf.round(square), 0.0, 255.0), tf.uint8)


def lighting_shifts(stats: Stats, std: float, seed: tf.Tensor, n: int) -> tf.Tensor:
    """Paper section 4.1: n RGB shifts V @ (alpha * lambda), alpha ~ N(0, std), in 0-255."""
    alpha = tf.random.stateless_normal([n, 3], seed, stddev=std)
    eigvec = tf.constant(stats.eigvec, tf.float32)
    return 255.0 * tf.matmul(
        alpha * tf.constant(stats.eigval, tf.float32), eigvec, transpose_b=True
    )


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """What the train and eval transforms need: the data's statistics and the input options."""

    stats: Stats
    image_size: int  # side of the crops the model sees
    resize_size: int  # shorter side, then the central square
    random_flip: bool = False
    pca_lighting_std: float = 0.0  # 0: no colour lighting
    divide_by_std: bool = False  # False: mean-subtracted 0-255 RGB, as the paper fed it
    ten_crop: bool = False  # eval: the paper's ten patches instead of the centre crop
    mean: str = "channel"  # 'image': subtract the mean image's window (section 2); 'channel'
    on_device: bool = False  # ship uint8 crops and what normalises them (device_input.py)
    loader: str = "tf.data"  # 'dali': DALI decodes and crops (dali_input.py)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, stats: Stats) -> Preprocess:
        """From a config's `input` section; refuses a mean image the statistics lack."""
        # Configs saved before these fields existed meant the channel mean, on the host.
        mean, on_device = cfg.get("mean", "channel"), cfg.get("normalize_on_device", False)
        if mean not in MEANS:
            raise UsageError(f"input.mean={mean!r} is unknown; use one of {MEANS}.")
        if mean == "image":
            side = None if stats.mean_image is None else stats.mean_image.shape[0]
            if side is None:
                raise UsageError(
                    f"input.mean='image' needs the training set's mean image, which "
                    f"input.dataset={cfg.dataset!r} does not provide (prepare_imagenet "
                    "--form=paper256 computes it for imagenet2012_paper256). Set "
                    "--config.input.mean=channel to subtract the per-channel mean."
                )
            if side != cfg.resize_size:
                raise UsageError(
                    f"input.mean='image': the mean image is {side}x{side} but "
                    f"input.resize_size={cfg.resize_size}; set --config.input.resize_size="
                    f"{side}, or --config.input.mean=channel."
                )
        return cls(
            stats,
            cfg.image_size,
            cfg.resize_size,
            cfg.random_flip,
            cfg.pca_lighting_std,
            cfg.divide_by_std,
            cfg.eval_ten_crop,
            mean,
            on_device,
            cfg.get("loader", "tf.data"),
        )


def train_draws(
    seed: int, step: tf.Tensor, batch_size: int, p: Preprocess
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The random choices for global batch `step`, a row per example: crop offsets [B, 2]
    (top, left), mirror flags [B] (int32) and lighting shifts [B, 3]. Drawn for the whole
    global batch from (seed, step) alone, so every process (taking its rows), every mesh and
    a resumed run see the same; a batch of draws costs what one example's did."""
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), step)
    crop_key, light_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    draw = tf.random.stateless_uniform(
        [batch_size, 3], crop_key, minval=None, maxval=None, dtype=tf.int32
    )
    offsets = draw[:, :2] % (p.resize_size - p.image_size + 1)  # floor mod: nonnegative
    flips = draw[:, 2] % 2 if p.random_flip else tf.zeros([batch_size], tf.int32)
    shifts = tf.zeros([batch_size, 3])
    if p.pca_lighting_std > 0:
        shifts = lighting_shifts(p.stats, p.pca_lighting_std, light_key, batch_size)
    return offsets, flips, shifts


def train_crop(image: tf.Tensor, offset: tf.Tensor, p: Preprocess) -> tf.Tensor:
    """The uint8 train window at `offset` [2] of a decoded image's central square at the
    resize size (unmirrored: `normalize` mirrors, here or on the device)."""
    square = resize_square(image, p.resize_size)
    return tf.slice(square, tf.concat([offset, [0]], 0), [p.image_size, p.image_size, 3])


def train_crop_jpeg(jpeg: tf.Tensor, offset: tf.Tensor, p: Preprocess) -> tf.Tensor:
    """`train_crop` of a JPEG stored at resize_size x resize_size, decoding only the window
    (several times faster than decoding the whole image). Without fancy chroma upsampling,
    which reads pixels across the window's edges, the pixels equal those of the whole image
    decoded the same way (sources.paper256_source) and cropped."""
    window = tf.concat([offset, [p.image_size, p.image_size]], 0)
    image = tf.io.decode_and_crop_jpeg(jpeg, window, channels=3, fancy_upscaling=False)
    return tf.ensure_shape(image, [p.image_size, p.image_size, 3])


def finish(
    images: tf.Tensor, offsets: tf.Tensor, flips: tf.Tensor, shifts: tf.Tensor, p: Preprocess
) -> dict[str, tf.Tensor]:
    """A batch of uint8 train crops with their mirror, lighting and normalisation: here, or
    (p.on_device) on the device from each crop's position, mirror flag and colour shift, which
    keeps the mirroring, too, off the host."""
    crops = tf.concat([offsets, flips[:, None]], 1)
    if p.on_device:
        return {"images": images, "crops": crops, "shifts": shifts}
    return {"images": normalize(images, crops, shifts, p)}


def _mirror(image: tf.Tensor, flag: tf.Tensor) -> tf.Tensor:
    """An [H, W, C] image reversed along its width if `flag` > 0."""
    return tf.cond(flag > 0, lambda: tf.reverse(image, [1]), lambda: image)


def normalize(image: tf.Tensor, crop: tf.Tensor, shift: tf.Tensor, p: Preprocess) -> tf.Tensor:
    """Float32 input of uint8 crops [..., H, W, 3] taken at `crop` [..., 3] = (top, left,
    mirror): add the lighting `shift` [..., 3], subtract the mean (the paper's 0-255 units;
    the mean image's window under each crop), optionally divide by the channel std, and
    mirror the crops so flagged. device_input.normalize is the same on the device."""
    size = image.shape[-2]
    flat = tf.reshape(crop, [-1, 3])
    # Mirrored first, while still uint8 (a quarter of the bytes to move), one crop at a time:
    # TensorFlow's batched reversals on the CPU (reverse_sequence, a select of reversed and
    # not) ran several times slower.
    crops = (tf.reshape(image, [-1, size, size, 3]), flat[:, 2])
    mirrored = tf.map_fn(lambda c: _mirror(*c), crops, fn_output_signature=image.dtype)
    image = tf.reshape(mirrored, tf.shape(image))
    image = tf.cast(image, tf.float32) + shift[..., None, None, :]
    if p.mean == "image":
        mean = tf.constant(p.stats.mean_image, tf.float32)
        window = lambda c: _mirror(tf.slice(mean, [c[0], c[1], 0], [size, size, 3]), c[2])
        windows = tf.map_fn(window, flat, fn_output_signature=tf.float32)
        image = image - tf.reshape(windows, tf.shape(image))
    else:
        image = image - tf.constant(p.stats.mean, tf.float32)
    if p.divide_by_std:
        image = image / tf.constant(channel_std(p.stats), tf.float32)
    return image


def channel_std(stats: Stats) -> np.ndarray:
    """The divisor of `divide_by_std`: the channel std, at least one grey level."""
    return np.maximum(stats.std(), 1.0).astype(np.float32)


def device_constants(p: Preprocess) -> dict[str, np.ndarray] | None:
    """What device_input.normalize needs to normalise `p`'s uint8 batches: the mean ([3], or
    the [S, S, 3] mean image) and the divisor ([3]; ones without divide_by_std); None where
    the host normalises (not p.on_device)."""
    if not p.on_device:
        return None
    mean = p.stats.mean_image if p.mean == "image" else np.asarray(p.stats.mean)
    std = channel_std(p.stats) if p.divide_by_std else np.ones(3)
    return {"mean": np.asarray(mean, np.float32), "std": np.asarray(std, np.float32)}


def eval_windows(resize_size: int, image_size: int, ten_crop: bool) -> np.ndarray:
    """Where evaluation cuts its crops out of a resize_size square, as (top, left, mirror):
    the centre [3], or the paper's ten patches [10, 3], four corners and centre and their
    mirrors (the last five are the first five again, mirrored by `normalize`). The same for
    every image: DALI builds its eval graph from them."""
    far, mid = resize_size - image_size, (resize_size - image_size) // 2
    if not ten_crop:
        return np.array([mid, mid, 0], np.int32)
    five = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
    return np.array([(t, left, flip) for flip in (0, 1) for t, left in five], np.int32)


def ten_crops(square: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The paper's ten patches of a square image [10, size, size, 3], with `eval_windows`."""
    where = eval_windows(square.shape[0], size, ten_crop=True)
    crops = [tf.slice(square, [t, left, 0], [size, size, 3]) for t, left, _ in where[:5]]
    return tf.stack(crops + crops), tf.constant(where)


def eval_preprocess(image: tf.Tensor, p: Preprocess) -> dict[str, tf.Tensor]:
    """Centre crop [H, W, 3], or the ten patches [10, H, W, 3] when `p.ten_crop`; normalised
    here, or (p.on_device) uint8 with their positions."""
    square = tf.ensure_shape(resize_square(image, p.resize_size), [p.resize_size] * 2 + [3])
    if p.ten_crop:
        crops, where = ten_crops(square, p.image_size)
    else:
        where = eval_windows(p.resize_size, p.image_size, ten_crop=False)
        crops = tf.slice(square, [where[0], where[1], 0], [p.image_size, p.image_size, 3])
        where = tf.constant(where)
    if p.on_device:
        return {"images": crops, "crops": where}
    return {"images": normalize(crops, where, tf.zeros(where.shape[:-1] + [3]), p)}
