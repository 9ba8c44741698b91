"""tf.data input pipeline over the sources of sources.py: the paper's augmentation (section 4.1),
input statistics, train and eval streams. Host side only: yields NumPy batches of this
process's slice of every global batch, either normalised float32 images or (input.
normalize_on_device) uint8 crops with what device_input.py needs to normalise them.

Every random choice is a stateless op seeded by (seed, step), drawn for the whole global
batch (each process takes its rows), and each epoch's order is a permutation seeded by (seed,
epoch), so the stream is a function of the seed and the position: a run resumed at step s sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath

from alexnet_jax.config_checks import MEANS
from alexnet_jax.errors import UsageError
from alexnet_jax.sources import Source, Split

PREFETCH_BATCHES = 2  # batches a stream prepares ahead of the loop (the host's share)


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


# ---------------------------------------------------------------------------- preprocessing


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


# ------------------------------------------------------------------------------- statistics


def compute_stats(split: Split, resize_size: int, max_images: int) -> Stats:
    """Mean image, mean and RGB-covariance eigen-decomposition over (up to max_images of) a
    training split, each image at resize_size x resize_size."""

    def moments(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        square = tf.cast(resize_square(split.decode(raw)[0], resize_size), tf.float64)
        pixels = tf.reshape(square, [-1, 3]) / 255.0
        return square, tf.matmul(pixels, pixels, transpose_a=True)

    ds = split.epoch(0, 0, 0).take(max_images).map(moments, parallelism(None))
    ds = on_threads(ds, None)
    total, outer, count = np.zeros((resize_size, resize_size, 3)), np.zeros((3, 3)), 0
    for s, o in iterate(ds, split):  # an undecodable image is named, not a TF traceback
        total, outer, count = total + s, outer + o, count + 1
    mean_image = total / count
    mean = mean_image.reshape(-1, 3).mean(0) / 255.0
    cov = outer / (count * resize_size**2) - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    return Stats(
        tuple(float(v) for v in mean * 255.0),
        tuple(float(v) for v in eigval),
        tuple(tuple(float(v) for v in row) for row in eigvec),
        mean_image.astype(np.float32),
    )


def get_stats(
    source: Source,
    resize_size: int,
    max_images: int,
    workdir: epath.PathLike | None,
    write: bool = True,
) -> Stats:
    """ImageNet's built-in statistics, else those stored with the data, else the training
    split's, cached in workdir (input_stats.json, input_mean_image.npy)."""
    if source.name == "imagenet2012":
        return IMAGENET_STATS
    if source.stats is not None:  # computed when the data was prepared
        return Stats.from_dict(source.stats, source.mean_image)
    key = f"{source.fingerprint}|resize={resize_size}|max={max_images}"
    path = epath.Path(workdir) / "input_stats.json" if workdir else None
    image_path = path.with_name("input_mean_image.npy") if path is not None else None
    if path is not None and path.exists() and image_path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            with image_path.open("rb") as f:
                return Stats.from_dict(cached, np.load(f))
    stats = compute_stats(source.train, resize_size, max_images)
    if path is not None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        for final, write_to in (
            (image_path, lambda f: np.save(f, stats.mean_image)),
            (path, lambda f: f.write(json.dumps({"key": key, **stats.to_dict()}).encode())),
        ):
            tmp = final.with_suffix(".tmp")
            with tmp.open("wb") as f:
                write_to(f)
            tmp.replace(final)
    return stats


# ----------------------------------------------------------------------------------- streams


def _process_batches(
    ds: tf.data.Dataset, batch: int, rows: Sequence[int] | None
) -> tf.data.Dataset:
    """Every whole global batch of keys, cut to these rows (all when None) before anything is
    read: each process reads and decodes only what its devices hold, and every process sees
    the same number of batches."""
    ds = ds.batch(batch, drop_remainder=True)
    if rows is not None and len(rows) < batch:
        rows = tf.constant(rows, tf.int64)
        ds = ds.map(lambda *x: tf.nest.map_structure(lambda t: tf.gather(t, rows), x))
    return ds


def _process_rows(
    ds: tf.data.Dataset,
    batch: int,
    rows: Sequence[int] | None,
    fetch: Callable,
    threads: int | None,
) -> tf.data.Dataset:
    """This process's examples of `_process_batches`, read with one `fetch` call per batch."""
    parallel = parallelism(threads)
    ds = _process_batches(ds, batch, rows)
    return ds.map(fetch, num_parallel_calls=parallel, deterministic=True).unbatch()


def parallelism(threads: int | None) -> int:
    """Calls in flight per parallel map: one per thread of the stream's pool."""
    return threads or os.cpu_count() or 1


def on_threads(ds: tf.data.Dataset, threads: int | None) -> tf.data.Dataset:
    """Run `ds` on a pool of `threads` (None: tf.data's default, every core of the host), with
    tf.data's autotuner off: destroying an iterator waits for the autotuner's thread, which
    at the end of a stream could hold up the loop's last `next` for tens of seconds.
    Parallelism and buffers are set explicitly."""
    options = tf.data.Options()
    options.autotune.enabled = False
    if threads is not None:
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1  # parallelism comes from the map, not ops
    return ds.with_options(options)


def _uncut(
    split: Split, records: Any, encoded: bool, p: Preprocess
) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """What dali_input cuts a batch's crops from, and the labels: the stored JPEGs
    (`encoded`), or the uint8 images' central squares at the resize size (`square`)."""
    if encoded:
        jpegs, labels = split.jpeg(records)
        return {"encoded": jpegs}, labels

    def square(record):
        image, label = split.unpack(record)
        return resize_square(image, p.resize_size), label

    side = p.resize_size
    spec = (tf.TensorSpec([side, side, 3], tf.uint8), tf.TensorSpec([], tf.int32))
    squares, labels = tf.map_fn(square, records, fn_output_signature=spec)
    return {"square": squares}, labels


def train_dataset(
    source: Source,
    preprocess: Preprocess,
    *,
    seed: int,
    batch_size: int,
    start_step: int,
    num_steps: int,
    rows: Sequence[int] | None = None,
    threads: int | None = None,
    decode: bool = True,
) -> tf.data.Dataset:
    """Global train batches start_step .. num_steps-1, or only their `rows` (see
    parallel.process_rows), prepared on `threads` host threads. With `decode=False` (for
    dali_input) the crops are not cut: each example carries what to cut them from, its JPEG
    (`encoded`) or its uint8 square at the resize size (`square`), and the crop's `window`."""
    n = source.train.size
    first = start_step * batch_size
    epoch0, offset = divmod(first, n)
    last_epoch = max(epoch0, math.ceil(num_steps * batch_size / n) - 1)
    ds = source.train.epoch(epoch0, seed, offset)
    for e in range(epoch0 + 1, last_epoch + 1):
        ds = ds.concatenate(source.train.epoch(e, seed, 0))
    ds = _process_batches(ds.enumerate(start=first), batch_size, rows)
    size = preprocess.image_size
    image_spec = tf.TensorSpec([size, size, 3], tf.uint8)
    # JPEGs stored at the resize size (the paper's 256) decode only their crop window.
    crop_only = source.stored_size == preprocess.resize_size and source.train.jpeg is not None

    def prepare(g, keys):
        # A batch per call: the draws are made for the batch, only decoding and cropping run
        # per example, and `finish` leaves mirroring to `normalize` (on the device, as the
        # paper config trains): on paper-256 data whatever runs besides decoding is overhead.
        step = g[0] // batch_size
        draws = train_draws(seed, step, batch_size, preprocess)
        offsets, flips, shifts = (tf.gather(d, g - step * batch_size) for d in draws)
        records = source.train.fetch(keys)
        if not decode:
            data, labels = _uncut(source.train, records, crop_only, preprocess)
            crops = tf.concat([offsets, flips[:, None]], 1)
            return {**data, "window": offsets, "crops": crops, "shifts": shifts, "labels": labels}
        if crop_only:
            jpegs, labels = source.train.jpeg(records)
            crop = lambda x: train_crop_jpeg(*x, preprocess)
            images = tf.map_fn(crop, (jpegs, offsets), fn_output_signature=image_spec)
        else:

            def crop(x):
                image, label = source.train.unpack(x[0])
                return train_crop(image, x[1], preprocess), label

            out = (image_spec, tf.TensorSpec([], tf.int32))
            images, labels = tf.map_fn(crop, (records, offsets), fn_output_signature=out)
        return {**finish(images, offsets, flips, shifts, preprocess), "labels": labels}

    ds = ds.map(prepare, num_parallel_calls=parallelism(threads), deterministic=True)
    return on_threads(ds.take(num_steps - start_step).prefetch(PREFETCH_BATCHES), threads)


def eval_dataset(
    source: Source,
    preprocess: Preprocess,
    *,
    batch_size: int,
    rows: Sequence[int] | None = None,
    threads: int | None = None,
    decode: bool = True,
) -> tf.data.Dataset:
    """Every eval example exactly once (of the global batches; a process reads its `rows`);
    the last global batch is padded with weight-0 rows. With `decode=False` (for dali_input)
    each example carries, instead of its crops, what to cut them from (as train_dataset's)."""
    split = source.eval
    encoded = source.stored_size == preprocess.resize_size and split.jpeg is not None
    side = preprocess.resize_size
    if not decode:  # where the crops of every example are taken (the same for all)
        where = eval_preprocess(tf.zeros([side, side, 3], tf.uint8), preprocess)["crops"]
    real = split.epoch(0, 0, 0).map(lambda key: (key, 1.0))
    ds = real.concatenate(tf.data.Dataset.from_tensors((split.pad_key, 0.0)).repeat(batch_size - 1))
    fetch = lambda g, example: (g, (split.fetch(example[0]), example[1]))
    ds = _process_rows(ds.enumerate(), batch_size, rows, fetch, threads)

    def prepare(g, example):
        record, weight = example
        if not decode:
            batched = tf.nest.map_structure(lambda x: x[None], record)
            first = lambda x: x[0]
            one = lambda: tf.nest.map_structure(first, _uncut(split, batched, encoded, preprocess))
            blank = lambda: (
                {"square": tf.zeros([side, side, 3], tf.uint8)},
                tf.constant(0, tf.int32),
            )
            # Padding rows carry a real JPEG (DALI decodes every row) and tf.data's label 0.
            data, label = one() if encoded else tf.cond(weight > 0, one, blank)
            label = tf.where(weight > 0, label, 0)
            return {**data, "crops": where, "labels": label, "weights": weight}
        image, label = tf.cond(
            weight > 0,
            lambda: split.unpack(record),
            lambda: (tf.zeros([1, 1, 3], tf.uint8), tf.constant(0, tf.int32)),
        )
        return {**eval_preprocess(image, preprocess), "labels": label, "weights": weight}

    ds = ds.map(prepare, num_parallel_calls=parallelism(threads), deterministic=True)
    local = batch_size if rows is None else len(rows)
    ds = ds.batch(local, drop_remainder=True).prefetch(PREFETCH_BATCHES)
    return on_threads(ds, threads)


def iterate(ds: tf.data.Dataset, split: Split) -> Iterator[dict[str, np.ndarray]]:
    """NumPy batches; an undecodable image stops the run with its name instead of a TF trace."""
    it = ds.as_numpy_iterator()
    while True:
        try:
            yield next(it)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            bad = find_undecodable(split)
            where = f": {bad}" if bad else ""
            raise UsageError(
                f"An input image could not be decoded{where}. Remove or re-encode it (JPEG, PNG, "
                f"BMP or GIF) and run the same command again; training resumes from the newest "
                f"checkpoint.\nTensorFlow said: {e.message.splitlines()[0]}"
            ) from None


def find_undecodable(split: Split, limit: int = 200_000) -> str | None:
    """The first example of `split` (in epoch 0's order) that fails to decode, if any."""
    for i, key in enumerate(split.epoch(0, 0, 0).take(limit)):
        try:
            split.decode(key)
        except tf.errors.InvalidArgumentError:
            return split.describe(i, key)
    return None


def undecodable(split: Split) -> list[int]:
    """The keys of every example of a random-access `split` that fails to decode: a parallel
    decoding pass that drops the failures, then the difference."""
    decodes = lambda key: (key, tf.shape(split.decode(key)[0]))
    ds = on_threads(split.epoch(0, 0, 0).map(decodes, num_parallel_calls=parallelism(None)), None)
    good = {int(k) for k, _ in ds.ignore_errors().as_numpy_iterator()}
    return sorted(set(range(split.size)) - good)


def skip_undecodable(source: Source, workdir: epath.PathLike | None, write: bool = True) -> Source:
    """`source` without the images that do not decode (input.skip_corrupt), found by one
    decoding pass over both splits before training, cached in workdir/undecodable.json."""
    if not (source.train.random_access and source.eval.random_access):
        raise UsageError(
            f"input.skip_corrupt needs random access to the data; {source.name} is stored as "
            "TFRecord. Prepare it as array_record (python -m alexnet_jax.prepare_imagenet)."
        )
    path = epath.Path(workdir) / "undecodable.json" if workdir else None
    cached = json.loads(path.read_text()) if path is not None and path.exists() else {}
    # Keyed by the files' names and sizes: indices into a folder that changed would name
    # other images.
    key = [source.fingerprint] + [
        s.contents() if s.contents else "" for s in (source.train, source.eval)
    ]
    if cached.get("key") != key:
        logging.info("input.skip_corrupt: decoding every image once to find the bad ones")
        cached = {"key": key}
        for name, split in (("train", source.train), ("eval", source.eval)):
            bad = undecodable(split)
            cached[name] = bad
            cached[f"{name}_names"] = [split.describe(0, tf.constant(k, tf.int64)) for k in bad]
        if path is not None and write:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
    for name in ("train", "eval"):
        if cached[name]:
            logging.warning(
                "input.skip_corrupt: leaving out %d undecodable %s images: %s",
                len(cached[name]),
                name,
                ", ".join(cached[f"{name}_names"][:10]),
            )
    return dataclasses.replace(
        source,
        train=source.train.without(cached["train"]),
        eval=source.eval.without(cached["eval"]),
    )
