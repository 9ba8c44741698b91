"""TFDS's stored records as splits: array_record shards read by index (random access), or
TFRecord files read in order. Both keep each image's JPEG undecoded until the stream decodes
it (or only its crop window)."""

from __future__ import annotations

import threading
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax.splits import IndexedSplit, Split, files_digest

# The two features of a TFDS imagenet2012 (or paper-256) tf.train.Example this project reads.
EXAMPLE_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def decode_jpeg(raw: tf.Tensor, fancy_upscaling: bool = True) -> tf.Tensor:
    image = tf.io.decode_jpeg(raw, channels=3, fancy_upscaling=fancy_upscaling)
    return tf.ensure_shape(image, [None, None, 3])


class ArrayRecordRows:
    """Records of a split's array_record shards by index, a batch of them per call, read
    straight from array_record's readers a record at a time. Each single-record read runs
    without Python's lock, so the stream's threads read in parallel; array_record's batched
    read holds the lock for the whole batch and costs more CPU per record (docs/imagenet.md).
    The threads share the readers: range and indexed reads do not change them (array_record's
    own data source shares them too)."""

    def __init__(self, instructions: list[Any]):
        self._paths = [str(i.filename) for i in instructions]
        self._skips = np.array([i.skip for i in instructions], np.int64)
        self._starts = np.cumsum([0] + [i.take for i in instructions])
        self._readers: list[Any] = [None] * len(instructions)
        self._lock = threading.Lock()

    def _open(self, shards: np.ndarray) -> list[Any]:
        """The readers, those of `shards` opened (once, by whichever thread needs them)."""
        with self._lock:
            for s in shards:
                if self._readers[s] is None:
                    from array_record.python.array_record_module import ArrayRecordReader

                    # No read-ahead: reads are random, a record at a time.
                    self._readers[s] = ArrayRecordReader(self._paths[s], "readahead_buffer_size:0")
            return self._readers

    def read(self, keys: np.ndarray) -> np.ndarray:
        """The serialized records of `keys` (indices into the split), in their order."""
        shard = np.searchsorted(self._starts, keys, side="right") - 1
        position = keys - self._starts[shard] + self._skips[shard]
        readers = self._open(np.unique(shard))
        out = np.empty(len(keys), dtype=object)
        for row, (s, i) in enumerate(zip(shard.tolist(), position.tolist(), strict=True)):
            out[row] = readers[s].read(i, i + 1)[0]  # a range: cheaper than a list of one index
        return out


def array_record_files(builder: Any, name: str) -> list[Any] | None:
    """The array_record shards of split `name` as TFDS describes them, if it does."""
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        return None
    try:
        return builder.info.splits[name].file_instructions
    except KeyError:  # no files described (TFDS's mock data)
        return None


class RecordSplit(IndexedSplit):
    """array_record: read only the records this process needs, in any order, a batch of them
    per Python call. The call returns the serialized examples, which TensorFlow parses, a batch
    at once, faster than TFDS's own per-example deserialisation in Python (docs/imagenet.md).
    Raises NotImplementedError where the split is not stored for random access (TFRecord)."""

    stores_jpeg = True

    def __init__(self, builder: Any, name: str, shuffle: bool, fancy_upscaling: bool = True):
        raw = tfds.decode.DeserializeMethod.RAW_BYTES
        source = builder.as_data_source(split=name, deserialize_method=raw)
        super().__init__(len(source), shuffle)
        self.name, self.fancy_upscaling = name, fancy_upscaling
        files = array_record_files(builder, name)
        if files is not None and sum(f.take for f in files) == self.size:
            self.read = ArrayRecordRows(files).read
        else:  # any other random-access storage TFDS serves
            self.read = lambda keys: np.array(
                source.__getitems__([int(k) for k in keys]), dtype=object
            )
        self.shards = [str(f.filename) for f in files] if files else None

    def fetch(self, keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        records = tf.numpy_function(self.read, [keys], tf.string, stateful=False)
        example = tf.io.parse_example(tf.ensure_shape(records, [None]), EXAMPLE_SPEC)
        return example["image"], tf.cast(example["label"], tf.int32)

    def unpack(self, record: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return decode_jpeg(record[0], self.fancy_upscaling), record[1]

    def jpeg(self, records: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return records

    def describe(self, i: int, key: tf.Tensor) -> str:
        return f"{self.name} record {int(key)}"

    def contents(self) -> str | None:
        return files_digest(self.shards) if self.shards else None


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch]).integers(2**31))


class SequentialSplit(Split):
    """TFRecord: no random access, so every process reads every record (and decodes only its
    own), and a resumed run re-reads its epoch up to its position. Raises AssertionError
    (TFDS's) where nothing was prepared."""

    random_access = False
    pad_key = {"jpeg": b"", "label": np.int32(0)}

    def __init__(self, builder: Any, cfg: ml_collections.ConfigDict, name: str, shuffle: bool):
        self.builder, self.name, self.shuffle = builder, name, shuffle
        self.shuffle_buffer = cfg.shuffle_buffer
        self._dataset()  # builds the reader only; raises AssertionError when nothing is there
        size = builder.info.splits[name].num_examples if name in builder.info.splits else 0
        if not size:  # split sizes unknown (e.g. TFDS mock data): count the records once
            size = int(self._dataset().reduce(np.int64(0), lambda n, _: n + 1))
        super().__init__(size)

    def _dataset(self, e: int = 0, seed: int = 0) -> tf.data.Dataset:
        read = tfds.ReadConfig(shuffle_seed=_epoch_seed(seed, e), interleave_cycle_length=16)
        ds = self.builder.as_dataset(
            split=self.name,
            shuffle_files=self.shuffle,
            read_config=read,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        # One dict per key: tf.data would unpack a tuple into two arguments.
        ds = ds.map(lambda x: {"jpeg": x["image"], "label": tf.cast(x["label"], tf.int32)})
        if self.shuffle:
            ds = ds.shuffle(self.shuffle_buffer, seed=_epoch_seed(seed, e))
        return ds

    def epoch(self, e: int, seed: int, start: int) -> tf.data.Dataset:
        return self._dataset(e, seed).skip(start)

    def unpack(self, record: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return decode_jpeg(record["jpeg"]), record["label"]

    def describe(self, i: int, key: Any) -> str:
        return f"{self.name} record {i}"
