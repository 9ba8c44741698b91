"""tf.data streams over the sources of sources.py, with the paper's transforms (transforms.py):
host side only, they yield this process's rows of every global batch as a batch.Batch of NumPy
arrays: normalised float32 images, or (input.normalize_on_device) uint8 crops with what
device_input.py needs to normalise them. What a stream does with each batch's records is a
`prepare` function: tf.data's crops here, or dali_input's hand-over to DALI.

Every random choice is a stateless op seeded by (seed, step), drawn for the whole global
batch (each process takes its rows), and each epoch's order is a permutation seeded by (seed,
epoch), so the stream is a function of the seed and the position: a run resumed at step s sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow as tf

from alexnet_jax.batch import Batch
from alexnet_jax.errors import UsageError
from alexnet_jax.sources import Source
from alexnet_jax.splits import Split
from alexnet_jax.transforms import (
    Preprocess,
    eval_preprocess,
    finish,
    train_crop,
    train_crop_jpeg,
    train_draws,
)

PREFETCH_BATCHES = 2  # batches a stream prepares ahead of the loop (the host's share)


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


Prepare = Callable[..., dict[str, tf.Tensor]]  # a stream's records -> a batch's tensors


def crop_batch(source: Source, p: Preprocess) -> Prepare:
    """tf.data's train crops: prepare(records, offsets, flips, shifts) of a batch of train
    records and their draws (transforms.train_draws) -> the batch's tensors."""
    size = p.image_size
    image_spec = tf.TensorSpec([size, size, 3], tf.uint8)
    # JPEGs stored at the resize size (the paper's 256) decode only their crop window.
    crop_only = source.stored_size == p.resize_size and source.train.stores_jpeg
    split = source.train

    def prepare(records, offsets, flips, shifts):
        if crop_only:
            jpegs, labels = split.jpeg(records)
            crop = lambda x: train_crop_jpeg(*x, p)
            images = tf.map_fn(crop, (jpegs, offsets), fn_output_signature=image_spec)
        else:

            def crop(x):
                image, label = split.unpack(x[0])
                return train_crop(image, x[1], p), label

            out = (image_spec, tf.TensorSpec([], tf.int32))
            images, labels = tf.map_fn(crop, (records, offsets), fn_output_signature=out)
        # `finish` leaves mirroring to `normalize` (on the device, as the paper config trains).
        return {**finish(images, offsets, flips, shifts, p), "labels": labels}

    return prepare


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
    prepare: Prepare | None = None,
) -> tf.data.Dataset:
    """Global train batches start_step .. num_steps-1, or only their `rows` (see
    parallel.process_rows), prepared on `threads` host threads: each batch's records and its
    draws (crop windows, mirrors, lighting) go to `prepare` (default: `crop_batch`; dali_input
    passes its own, which hands DALI what to cut)."""
    n = source.train.size
    first = start_step * batch_size
    epoch0, offset = divmod(first, n)
    last_epoch = max(epoch0, math.ceil(num_steps * batch_size / n) - 1)
    ds = source.train.epoch(epoch0, seed, offset)
    for e in range(epoch0 + 1, last_epoch + 1):
        ds = ds.concatenate(source.train.epoch(e, seed, 0))
    ds = _process_batches(ds.enumerate(start=first), batch_size, rows)
    prepare = prepare or crop_batch(source, preprocess)

    def draw_and_prepare(g, keys):
        # A batch per call: the draws are made for the batch, only decoding and cropping run
        # per example: on paper-256 data whatever runs besides decoding is overhead.
        step = g[0] // batch_size
        draws = train_draws(seed, step, batch_size, preprocess)
        offsets, flips, shifts = (tf.gather(d, g - step * batch_size) for d in draws)
        return prepare(source.train.fetch(keys), offsets, flips, shifts)

    ds = ds.map(draw_and_prepare, num_parallel_calls=parallelism(threads), deterministic=True)
    return on_threads(ds.take(num_steps - start_step).prefetch(PREFETCH_BATCHES), threads)


def crop_example(split: Split, p: Preprocess) -> Prepare:
    """tf.data's eval crops: prepare(record, weight) of one eval example (weight 0: a padding
    row, whose record is not read) -> its tensors."""

    def prepare(record, weight):
        image, label = tf.cond(
            weight > 0,
            lambda: split.unpack(record),
            lambda: (tf.zeros([1, 1, 3], tf.uint8), tf.constant(0, tf.int32)),
        )
        return {**eval_preprocess(image, p), "labels": label, "weights": weight}

    return prepare


def eval_dataset(
    source: Source,
    preprocess: Preprocess,
    *,
    batch_size: int,
    rows: Sequence[int] | None = None,
    threads: int | None = None,
    prepare: Prepare | None = None,
) -> tf.data.Dataset:
    """Every eval example exactly once (of the global batches; a process reads its `rows`);
    the last global batch is padded with weight-0 rows. Each example goes to `prepare`
    (default: `crop_example`)."""
    split = source.eval
    real = split.epoch(0, 0, 0).map(lambda key: (key, 1.0))
    ds = real.concatenate(tf.data.Dataset.from_tensors((split.pad_key, 0.0)).repeat(batch_size - 1))
    fetch = lambda g, example: (g, (split.fetch(example[0]), example[1]))
    ds = _process_rows(ds.enumerate(), batch_size, rows, fetch, threads)
    prepare = prepare or crop_example(split, preprocess)
    each = lambda g, example: prepare(*example)
    ds = ds.map(each, num_parallel_calls=parallelism(threads), deterministic=True)
    local = batch_size if rows is None else len(rows)
    ds = ds.batch(local, drop_remainder=True).prefetch(PREFETCH_BATCHES)
    return on_threads(ds, threads)


def train_batches(source: Source, p: Preprocess, **stream: Any) -> Iterator[Batch]:
    """`train_dataset`'s batches (same keyword arguments) as NumPy."""
    return (Batch(**b) for b in iterate(train_dataset(source, p, **stream), source.train))


def eval_batches(source: Source, p: Preprocess, **stream: Any) -> Iterator[Batch]:
    """`eval_dataset`'s batches (same keyword arguments) as NumPy."""
    return (Batch(**b) for b in iterate(eval_dataset(source, p, **stream), source.eval))


def iterate(ds: tf.data.Dataset, split: Split) -> Iterator[Any]:
    """`ds`'s elements as NumPy; an undecodable image of `split` stops the run with its name
    instead of a TF trace."""
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
