"""A dataset split as the streams read it: cheap keys in a seeded order per epoch, records read
a batch of keys at a time, and records decoded one at a time into (image, label).

Keys are cheap (an index where the storage has random access), so each process slices out its
rows of the global batch before anything is read; reading a batch per call keeps Python (which
TFDS's array_record reader needs) out of the per-example path. The kinds of storage are
subclasses: arrays in memory, image files, and TFDS's records (records.py).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import tensorflow as tf

from alexnet_jax.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class Split:
    """One split of `size` examples. Subclasses define `epoch` and `unpack`, and where a key
    is not its own record, `fetch`."""

    random_access = True  # False: every process reads every record (TFRecord)
    stores_jpeg = False  # True: `jpeg` gives each record's stored JPEG, undecoded
    pad_key: Any = np.int64(0)  # a key of the right type for padding eval batches (not read)

    def __init__(self, size: int) -> None:
        self.size = size

    def epoch(self, e: int, seed: int, start: int) -> tf.data.Dataset:
        """The keys in epoch `e`'s order (a function of (seed, e)) from position `start`."""
        raise NotImplementedError

    def fetch(self, keys: Any) -> Any:
        """The records of a batch of keys [n], read in one call."""
        return keys

    def unpack(self, record: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """One record -> (uint8 [H, W, 3] image, int32 label)."""
        raise NotImplementedError

    def jpeg(self, records: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """A batch of records -> (their stored JPEGs, labels), where `stores_jpeg`."""
        raise NotImplementedError(f"{type(self).__name__} stores no JPEGs")

    def describe(self, i: int, key: tf.Tensor) -> str:
        """Names example `i` of an epoch (key `key`) in error messages."""
        return f"example {int(key)}"

    def contents(self) -> str | None:
        """A digest of the names and sizes of the files that hold the split (None: fixed
        data), for caches that must go stale when files are added, removed or replaced."""
        return None

    def decode(self, key: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """Read and decode one example."""
        records = self.fetch(tf.nest.map_structure(lambda k: tf.expand_dims(k, 0), key))
        return self.unpack(tf.nest.map_structure(lambda r: r[0], records))

    def without(self, bad: list[int]) -> Split:
        """This split without the examples of keys `bad` (random-access splits): every epoch
        keeps its order among the rest, so a resumed run still sees what it would have."""
        return _Without(self, bad) if bad else self


class _Without(Split):
    """A split with some keys left out (Split.without)."""

    def __init__(self, split: Split, bad: list[int]) -> None:
        super().__init__(split.size - len(bad))
        self.split = split
        self.bad = tf.constant(sorted(bad), tf.int64)
        self.random_access, self.stores_jpeg = split.random_access, split.stores_jpeg
        self.pad_key = split.pad_key

    def epoch(self, e: int, seed: int, start: int) -> tf.data.Dataset:
        keep = lambda key: tf.reduce_all(key != self.bad)
        return self.split.epoch(e, seed, 0).filter(keep).skip(start)

    def fetch(self, keys: Any) -> Any:
        return self.split.fetch(keys)

    def unpack(self, record: Any) -> tuple[tf.Tensor, tf.Tensor]:
        return self.split.unpack(record)

    def jpeg(self, records: Any) -> tuple[tf.Tensor, tf.Tensor]:
        return self.split.jpeg(records)

    def describe(self, i: int, key: tf.Tensor) -> str:
        return self.split.describe(i, key)

    def contents(self) -> str | None:
        return self.split.contents()


def permutation(n: int, seed: int, epoch: int) -> tf.Tensor:
    """A permutation of range(n) that depends only on (seed, epoch): the argsort of stateless
    random int64 keys (collisions are negligible; the stable sort settles them anyway)."""
    seeds = tf.constant([seed, epoch], tf.int64)
    keys = tf.random.stateless_uniform([n], seeds, minval=None, maxval=None, dtype=tf.int64)
    return tf.cast(tf.argsort(keys, stable=True), tf.int64)


class IndexedSplit(Split):
    """A random-access split: keys are example indices, permuted per (seed, epoch) when
    `shuffle` (the training split), in order otherwise."""

    def __init__(self, size: int, shuffle: bool) -> None:
        super().__init__(size)
        self.shuffle = shuffle

    def epoch(self, e: int, seed: int, start: int) -> tf.data.Dataset:
        if not self.shuffle:
            return tf.data.Dataset.range(start, self.size)
        # Computed when the epoch is reached, not embedded as a constant: a 90-epoch ImageNet
        # stream would otherwise hold 90 permutations of 1.28M indices from the start.
        size = self.size
        order = tf.data.Dataset.from_tensors(np.int64(0)).map(lambda _: permutation(size, seed, e))
        return order.unbatch().skip(start)


class ArraySplit(IndexedSplit):
    """A split held in memory: uint8 images [n, H, W, 3] and their labels [n]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, shuffle: bool) -> None:
        super().__init__(len(labels), shuffle)
        self.images, self.labels = tf.constant(images), tf.constant(labels.astype(np.int32))

    def unpack(self, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.gather(self.images, record), tf.gather(self.labels, record)


def files_digest(paths: list[str]) -> str:
    """A digest of the files' names and sizes, in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p}\0{os.stat(p).st_size}\n".encode())
    return h.hexdigest()[:16]


class FolderSplit(IndexedSplit):
    """Image files (JPEG, PNG, BMP or GIF) under root/<class>/, labelled by `classes`' order.
    Raises UsageError where there are no images, or (the training split: `shuffle`) a class
    folder holds none."""

    def __init__(self, root: Any, classes: list[str], shuffle: bool) -> None:
        paths, labels, empty = [], [], []
        for label, name in enumerate(classes):
            d = root / name
            if not d.is_dir():
                continue
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            paths += [str(p) for p in files]
            labels += [label] * len(files)
            if not files:
                empty.append(name)
        if not paths:
            raise UsageError(
                f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/. Put each "
                "class's images in a sub-folder named after the class."
            )
        if shuffle and empty:  # the training split: a class without images cannot be learnt
            raise UsageError(
                f"{len(empty)} class folder(s) under {root} hold no images "
                f"({', '.join(IMAGE_EXTENSIONS)}): {empty[:5]}. Each folder of the training "
                "split is a class; add its images, or remove the folder."
            )
        super().__init__(len(paths), shuffle)
        self.paths = paths
        self._paths, self._labels = tf.constant(paths), tf.constant(labels, tf.int32)

    def unpack(self, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        data = tf.io.read_file(tf.gather(self._paths, record))
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.ensure_shape(image, [None, None, 3]), tf.gather(self._labels, record)

    def describe(self, i: int, key: tf.Tensor) -> str:
        return self.paths[int(key)]

    def contents(self) -> str | None:
        return files_digest(self.paths)
