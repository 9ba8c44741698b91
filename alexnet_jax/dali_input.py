"""input.loader=dali: NVIDIA DALI decodes and cuts the crops that input_pipeline chooses.

tf.data still reads the records, draws each batch's crop windows, mirrors and lighting from
(seed, step), and batches (input_pipeline's streams, with this module's `prepare` functions
handing over what DALI cuts the crops from); DALI decodes only each
window of the stored JPEGs (nvJPEG with device="mixed" where JAX computes on a GPU, and the GPU's
hardware JPEG decoder where it has one; libjpeg-turbo on the CPU elsewhere), or cuts windows of
uint8 images that are not stored as JPEGs at the resize size. The batches keep the uint8
contract of device_input: crops, where each was taken, lighting shifts, labels. Crops decoded on
a GPU stay there: they reach JAX as device arrays (DLPack), not through the host.

DALI upsamples JPEG chroma with interpolation (libjpeg-turbo's "fancy" upsampling, and nvJPEG's
own); tf.data decodes windows without it, so the two loaders' pixels differ slightly on JPEGs
(docs/imagenet.md gives the measured difference). Install with `pip install -e ".[dali]"`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from alexnet_jax import input_pipeline, transforms
from alexnet_jax.batch import Batch
from alexnet_jax.errors import UsageError
from alexnet_jax.sources import Source
from alexnet_jax.splits import Split


def device() -> str:
    """DALI's decoder backend: 'mixed' (GPU decoding) where JAX computes on a GPU."""
    import jax

    return "mixed" if jax.default_backend() == "gpu" else "cpu"


def _first_gpu() -> int:
    """The CUDA ordinal of this process's first device (its own GPU under one process per
    GPU, whatever CUDA_VISIBLE_DEVICES shows)."""
    import jax

    return jax.local_devices()[0].local_hardware_id


class _Pipeline:
    """A DALI pipeline fed a batch at a time: `data` (a JPEG, or a uint8 image, per example)
    and, in training, each example's window (top, left); out come the crops as uint8 NumPy,
    or as a jax.Array where they were decoded on a GPU."""

    def __init__(self, batch: int, size: int, where: np.ndarray | None, threads: int) -> None:
        self.batch, self.size, self.where, self.threads = batch, size, where, threads
        self.backend = device()  # fixed for the run: JAX's backend does not change
        self._built: dict[bool, Any] = {}

    def _build(self, encoded: bool) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        backend, size, where = self.backend, self.size, self.where
        gpu = _first_gpu() if backend == "mixed" else None

        @pipeline_def(batch_size=self.batch, num_threads=self.threads, device_id=gpu)
        def pipeline():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1 if encoded else 3)
            if where is None:  # training: each example's own window, (x, y) = (left, top)
                anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
                shape = np.array([size, size], np.int32)
                cut = dict(normalized_anchor=False, normalized_shape=False, axis_names="WH")
                if encoded:  # decodes only the window
                    return fn.decoders.image_slice(
                        data, anchor, shape, device=backend, output_type=types.RGB, **cut
                    )
                image = data.gpu() if gpu is not None else data
                return fn.slice(image, anchor, shape, **cut)
            image = data
            if encoded:
                image = fn.decoders.image(data, device=backend, output_type=types.RGB)
            elif gpu is not None:
                image = image.gpu()
            # Evaluation: the same windows of every image (the centre, or the ten patches'
            # five, twice: device_input mirrors the second five).
            cut = lambda t, left: fn.slice(
                image, start=[left, t], shape=[size, size], axis_names="WH"
            )
            if where.ndim == 1:
                return cut(where[0], where[1])
            five = fn.stack(*[cut(t, left) for t, left, _ in where[:5]])
            return fn.cat(five, five, axis=0)

        p = pipeline(prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        p.build()
        return p

    def __call__(self, data: list[np.ndarray], windows: np.ndarray | None) -> np.ndarray:
        encoded = data[0].ndim == 1
        if encoded not in self._built:
            self._built[encoded] = self._build(encoded)
        p = self._built[encoded]
        p.feed_input("data", data)
        if windows is not None:
            p.feed_input("anchor", list(np.ascontiguousarray(windows[:, ::-1], np.int32)))
        (out,) = p.run()
        if self.backend == "mixed":  # decoded on the GPU: stays there
            return to_jax(out)
        return out.as_array()


def to_jax(gpu_batch: Any) -> Any:
    """A DALI batch on a GPU (a TensorListGPU) as a jax.Array on that GPU, through DLPack and
    without a trip through the host; copied, as DALI reuses its output buffers for the next
    batch. parallel.global_batch places it on the process's devices like a NumPy batch."""
    import jax

    return jax.dlpack.from_dlpack(gpu_batch.as_tensor()).copy()


def _uncut(split: Split, records: Any, encoded: bool, side: int) -> tuple[dict, tf.Tensor]:
    """What DALI cuts a batch's crops from, and the labels: the stored JPEGs (`encoded`), or
    the uint8 images' central squares at the resize size `side` (`square`)."""
    if encoded:
        jpegs, labels = split.jpeg(records)
        return {"encoded": jpegs}, labels

    def square(record):
        image, label = split.unpack(record)
        return transforms.resize_square(image, side), label

    spec = (tf.TensorSpec([side, side, 3], tf.uint8), tf.TensorSpec([], tf.int32))
    squares, labels = tf.map_fn(square, records, fn_output_signature=spec)
    return {"square": squares}, labels


def _encoded(source: Source, split: Split, p: transforms.Preprocess) -> bool:
    """Whether DALI decodes `split`'s stored JPEGs (stored at the resize size), else cuts
    uint8 squares tf.data decoded."""
    return source.stored_size == p.resize_size and split.stores_jpeg


def train_prepare(source: Source, p: transforms.Preprocess) -> input_pipeline.Prepare:
    """input_pipeline.train_dataset's `prepare` for DALI: each batch's JPEGs or squares with
    its draws (the windows to cut, and the crops and shifts device_input needs)."""
    encoded = _encoded(source, source.train, p)

    def prepare(records, offsets, flips, shifts):
        data, labels = _uncut(source.train, records, encoded, p.resize_size)
        crops = tf.concat([offsets, flips[:, None]], 1)
        return {**data, "window": offsets, "crops": crops, "shifts": shifts, "labels": labels}

    return prepare


def eval_prepare(source: Source, p: transforms.Preprocess) -> input_pipeline.Prepare:
    """input_pipeline.eval_dataset's `prepare` for DALI: each example's JPEG or square, and
    where its crops are cut (the same for all: transforms.eval_windows)."""
    split, side = source.eval, p.resize_size
    encoded = _encoded(source, split, p)
    where = tf.constant(transforms.eval_windows(side, p.image_size, p.ten_crop))

    def prepare(record, weight):
        batched = tf.nest.map_structure(lambda x: x[None], record)
        first = lambda x: x[0]
        one = lambda: tf.nest.map_structure(first, _uncut(split, batched, encoded, side))
        blank = lambda: ({"square": tf.zeros([side, side, 3], tf.uint8)}, tf.constant(0, tf.int32))
        # Padding rows carry a real JPEG (DALI decodes every row) and tf.data's label 0.
        data, label = one() if encoded else tf.cond(weight > 0, one, blank)
        label = tf.where(weight > 0, label, 0)
        return {**data, "crops": where, "labels": label, "weights": weight}

    return prepare


def _examples(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The batch's JPEGs as byte arrays, or its uint8 squares, one per example."""
    if "encoded" in batch:
        return [np.frombuffer(b, np.uint8) for b in batch.pop("encoded")]
    return list(batch.pop("square"))


def _decoded(
    batches: Iterator[dict[str, np.ndarray]], cut: _Pipeline, split: Split, train: bool
) -> Iterator[Batch]:
    """`batches` with DALI's crops as their images; an image DALI cannot decode stops the run
    with its name, as input_pipeline.iterate does."""
    for batch in batches:
        data = _examples(batch)
        try:
            images = cut(data, batch.pop("window") if train else None)
        except RuntimeError as e:
            bad = input_pipeline.find_undecodable(split)
            raise UsageError(
                f"An input image could not be decoded{': ' + bad if bad else ''}. Remove or "
                f"re-encode it and run the same command again; training resumes from the "
                f"newest checkpoint.\nDALI said: {str(e).strip().splitlines()[0]}"
            ) from None
        yield Batch(images=images, **batch)


def _ahead(make: Callable[[], Iterator[dict]], depth: int = 2) -> Iterator[dict]:
    """`make()`'s batches, produced on a thread of their own `depth` batches ahead of the
    loop (DALI decodes on its threads meanwhile); its errors are raised here."""
    out: queue.Queue = queue.Queue(depth)
    end = object()

    def produce() -> None:
        try:
            for batch in make():
                out.put(batch)
            out.put(end)
        except BaseException as e:  # handed to the consumer, raised there
            out.put(e)

    threading.Thread(target=produce, daemon=True, name="dali-input").start()
    while (item := out.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


def _cut(
    ds: tf.data.Dataset,
    split: Split,
    p: transforms.Preprocess,
    where: np.ndarray | None,
    threads: int | None,
    stream: dict[str, Any],
) -> Iterator[Batch]:
    """The batches of `ds` (a stream with this module's `prepare`) with DALI's crops: at each
    example's window in training (`where` None), else at `where`."""
    rows = stream.get("rows")
    local = stream["batch_size"] if rows is None else len(rows)
    cut = _Pipeline(local, p.image_size, where, input_pipeline.parallelism(threads))
    train = where is None
    return _ahead(lambda: _decoded(input_pipeline.iterate(ds, split), cut, split, train))


def train_batches(
    source: Source, p: transforms.Preprocess, *, threads: int | None, **stream: Any
) -> Iterator[Batch]:
    """input_pipeline.train_dataset's batches (same keyword arguments), cut by DALI."""
    prepare = train_prepare(source, p)
    ds = input_pipeline.train_dataset(source, p, threads=threads, prepare=prepare, **stream)
    return _cut(ds, source.train, p, None, threads, stream)


def eval_batches(
    source: Source, p: transforms.Preprocess, *, threads: int | None, **stream: Any
) -> Iterator[Batch]:
    """input_pipeline.eval_dataset's batches (same keyword arguments), cut by DALI."""
    prepare = eval_prepare(source, p)
    ds = input_pipeline.eval_dataset(source, p, threads=threads, prepare=prepare, **stream)
    where = transforms.eval_windows(p.resize_size, p.image_size, p.ten_crop)
    return _cut(ds, source.eval, p, where, threads, stream)
