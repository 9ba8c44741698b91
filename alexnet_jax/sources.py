"""Data sources: TFDS imagenet2012, a folder of class sub-folders, and the embedded digits.

A source has a train and an eval Split. A split yields cheap keys in a seeded per-epoch order
(an index where the storage allows random access) and decodes a key into (image, label), so the
input pipeline can give each process its rows of every global batch before anything is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from alexnet_jax import staging
from alexnet_jax.errors import UsageError

DATASETS = ("digits", "imagenet2012", "imagenet2012_paper256", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


@dataclasses.dataclass
class Split:
    """One split. `epoch(e, seed, start)` yields keys in epoch e's order from position `start`;
    `fetch(keys)` reads a batch of keys' records in one call, and `unpack(record)` decodes one
    into (uint8 HxWx3 image, int32 label).

    Keys are cheap (an index where the source has random access), so each process slices out
    its rows of the global batch before anything is read; reading a batch per call keeps
    Python (which TFDS's array_record reader needs) out of the per-example path.
    """

    size: int
    epoch: Callable[[int, int, int], tf.data.Dataset]
    fetch: Callable[[Any], Any]  # keys [n] -> records [n]
    unpack: Callable[[Any], tuple[tf.Tensor, tf.Tensor]]  # one record -> (image, label)
    pad_key: object  # a key of the right type for padding eval batches (never decoded)
    describe: Callable[[int, tf.Tensor], str]  # names example (i, key) in error messages
    random_access: bool = True  # False: every process reads every record (TFRecord)
    jpeg: Callable[[Any], tuple[tf.Tensor, tf.Tensor]] | None = None  # record -> (JPEG, label)
    # A digest of the names and sizes of the files that hold the split (None: fixed data), for
    # caches that must go stale when files are added, removed or replaced.
    contents: Callable[[], str] | None = None

    def without(self, bad: list[int]) -> Split:
        """This split without the examples of keys `bad` (random-access splits): every epoch
        keeps its order among the rest, so a resumed run still sees what it would have."""
        if not bad:
            return self
        bad_keys = tf.constant(sorted(bad), tf.int64)
        keep = lambda key: tf.reduce_all(key != bad_keys)
        epoch = lambda e, seed, start: self.epoch(e, seed, 0).filter(keep).skip(start)
        return dataclasses.replace(self, size=self.size - len(bad), epoch=epoch)

    def decode(self, key: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """Read and decode one example."""
        records = self.fetch(tf.nest.map_structure(lambda k: tf.expand_dims(k, 0), key))
        return self.unpack(tf.nest.map_structure(lambda r: r[0], records))


@dataclasses.dataclass
class Source:
    name: str
    fingerprint: str  # identifies the data, for the statistics cache
    class_names: list[str]
    train: Split
    eval: Split
    stats: dict | None = None  # input statistics stored with the data (transforms.Stats)
    stored_size: int | None = None  # every image stored as a square of this side
    mean_image: np.ndarray | None = None  # the training set's, stored with the data

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _permutation(n: int, seed: int, epoch: int) -> tf.Tensor:
    """A permutation of range(n) that depends only on (seed, epoch): the argsort of stateless
    random int64 keys (collisions are negligible; the stable sort settles them anyway)."""
    seeds = tf.constant([seed, epoch], tf.int64)
    keys = tf.random.stateless_uniform([n], seeds, minval=None, maxval=None, dtype=tf.int64)
    return tf.cast(tf.argsort(keys, stable=True), tf.int64)


def _indexed_split(
    size: int,
    read: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
    shuffle: bool,
    describe: Callable[[int, tf.Tensor], str],
    fetch: Callable[[tf.Tensor], Any] = lambda keys: keys,
) -> Split:
    """A random-access split: keys are example indices, permuted per (seed, epoch); `read`
    decodes what `fetch` (default: nothing, `read` takes the index) gives for one index."""

    def epoch(e: int, seed: int, start: int) -> tf.data.Dataset:
        if not shuffle:
            return tf.data.Dataset.range(start, size)
        # Computed when the epoch is reached, not embedded as a constant: a 90-epoch ImageNet
        # stream would otherwise hold 90 permutations of 1.28M indices from the start.
        order = tf.data.Dataset.from_tensors(np.int64(0)).map(lambda _: _permutation(size, seed, e))
        return order.unbatch().skip(start)

    return Split(size, epoch, fetch, read, np.int64(0), describe)


def _array_split(images: np.ndarray, labels: np.ndarray, shuffle: bool) -> Split:
    """A split held in memory."""
    images_t, labels_t = tf.constant(images), tf.constant(labels.astype(np.int32))
    read = lambda i: (tf.gather(images_t, i), tf.gather(labels_t, i))
    return _indexed_split(len(labels), read, shuffle, lambda i, key: f"example {int(key)}")


def digits_source() -> Source:
    """scikit-learn's 1,797 real 8x8 handwritten digits (bundled, no download), grey to RGB.

    The split is fixed (seeded permutation, 360 held-out images) whatever the run's seed.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    order = np.random.default_rng(20121203).permutation(len(images))
    test, train = order[:360], order[360:]
    names = [str(d) for d in range(10)]
    return Source(
        "digits",
        "sklearn-digits-1797",
        names,
        _array_split(images[train], data.target[train], shuffle=True),
        _array_split(images[test], data.target[test], shuffle=False),
    )


def files_digest(paths: list[str]) -> str:
    """A digest of the files' names and sizes, in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p}\0{os.stat(p).st_size}\n".encode())
    return h.hexdigest()[:16]


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def _folder_split(root: Path, classes: list[str], shuffle: bool) -> Split:
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
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/. Put each class's "
            "images in a sub-folder named after the class."
        )
    if shuffle and empty:  # the training split: a class without images cannot be learnt
        raise UsageError(
            f"{len(empty)} class folder(s) under {root} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}): {empty[:5]}. Each folder of the training split "
            "is a class; add its images, or remove the folder."
        )
    paths_t, labels_t = tf.constant(paths), tf.constant(labels, tf.int32)
    read = lambda i: (_decode_file(tf.gather(paths_t, i)), tf.gather(labels_t, i))
    split = _indexed_split(len(paths), read, shuffle, lambda i, key: paths[int(key)])
    return dataclasses.replace(split, contents=lambda: files_digest(paths))


def imagefolder_source(cfg: ml_collections.ConfigDict) -> Source:
    """`input.data_dir`/{train_split,eval_split}/<class name>/<image files>."""
    if not cfg.data_dir:
        raise UsageError(
            "input.dataset='imagefolder' needs --config.input.data_dir=DIR, with DIR/"
            f"{cfg.train_split}/<class>/*.jpg and DIR/{cfg.eval_split}/<class>/*.jpg."
        )
    root = Path(cfg.data_dir).expanduser()
    train_dir, eval_dir = root / cfg.train_split, root / cfg.eval_split
    for d in (train_dir, eval_dir):
        if not d.is_dir():
            raise UsageError(
                f"Image folder {d} does not exist. input.dataset='imagefolder' reads "
                f"{root}/{cfg.train_split}/<class>/ and {root}/{cfg.eval_split}/<class>/."
            )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    unknown = sorted({p.name for p in eval_dir.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise UsageError(f"{eval_dir} has classes that {train_dir} lacks: {unknown[:5]}.")
    return Source(
        "imagefolder",
        f"imagefolder:{root.resolve()}",
        classes,
        _folder_split(train_dir, classes, shuffle=True),
        _folder_split(eval_dir, classes, shuffle=False),
    )


def _imagenet_not_prepared(cfg: ml_collections.ConfigDict, data_dir: str) -> UsageError:
    manual = cfg.manual_dir or os.path.join(data_dir, "downloads", "manual")
    return UsageError(
        f"ImageNet (TFDS imagenet2012) is not prepared in {data_dir}. Download "
        f"{' and '.join(IMAGENET_TARS)} from https://image-net.org (a login is needed), put "
        f"both in {manual}, then run once:\n"
        f"  python -m alexnet_jax.prepare_imagenet --data_dir={data_dir} --manual_dir={manual}\n"
        f"and pass --config.input.data_dir={data_dir} to launch.py."
    )


def _jpeg(raw: tf.Tensor, fancy_upscaling: bool = True) -> tf.Tensor:
    image = tf.io.decode_jpeg(raw, channels=3, fancy_upscaling=fancy_upscaling)
    return tf.ensure_shape(image, [None, None, 3])


# The two features of a TFDS imagenet2012 (or paper-256) tf.train.Example this project reads.
EXAMPLE_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


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


def tfds_random_access(
    builder: Any, name: str, shuffle: bool, fancy_upscaling: bool = True
) -> Split:
    """array_record: read only the records this process needs, in any order, a batch of them
    per Python call. The call returns the serialized examples, which TensorFlow parses, a batch
    at once, faster than TFDS's own per-example deserialisation in Python (docs/imagenet.md)."""
    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    # Raises NotImplementedError where the split is not stored for random access (TFRecord).
    source = builder.as_data_source(split=name, deserialize_method=raw)
    size = len(source)
    files = array_record_files(builder, name)
    if files is not None and sum(f.take for f in files) == size:
        read = ArrayRecordRows(files).read
    else:  # any other random-access storage TFDS serves
        read = lambda keys: np.array(source.__getitems__([int(k) for k in keys]), dtype=object)

    def fetch(keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        records = tf.numpy_function(read, [keys], tf.string, stateful=False)
        example = tf.io.parse_example(tf.ensure_shape(records, [None]), EXAMPLE_SPEC)
        return example["image"], tf.cast(example["label"], tf.int32)

    def unpack(record: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return _jpeg(record[0], fancy_upscaling), record[1]

    describe = lambda i, key: f"{name} record {int(key)}"
    split = _indexed_split(size, unpack, shuffle, describe, fetch)
    shards = [str(f.filename) for f in files] if files is not None else None
    contents = (lambda: files_digest(shards)) if shards else None
    return dataclasses.replace(split, jpeg=lambda record: record, contents=contents)


def _tfds_sequential(
    builder: Any, cfg: ml_collections.ConfigDict, name: str, shuffle: bool
) -> Split:
    """TFRecord: no random access, so every process reads every record (and decodes only its
    own), and a resumed run re-reads its epoch up to its position."""

    def dataset(e: int = 0, seed: int = 0) -> tf.data.Dataset:
        read = tfds.ReadConfig(shuffle_seed=_epoch_seed(seed, e), interleave_cycle_length=16)
        ds = builder.as_dataset(
            split=name,
            shuffle_files=shuffle,
            read_config=read,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        # One dict per key: tf.data would unpack a tuple into two arguments.
        ds = ds.map(lambda x: {"jpeg": x["image"], "label": tf.cast(x["label"], tf.int32)})
        if shuffle:
            ds = ds.shuffle(cfg.shuffle_buffer, seed=_epoch_seed(seed, e))
        return ds

    dataset()  # builds the reader only; raises AssertionError when nothing was prepared
    size = builder.info.splits[name].num_examples if name in builder.info.splits else 0
    if not size:  # split sizes unknown (e.g. TFDS mock data): count the records once
        size = int(dataset().reduce(np.int64(0), lambda n, _: n + 1))
    epoch = lambda e, seed, start: dataset(e, seed).skip(start)
    unpack = lambda key: (_jpeg(key["jpeg"]), key["label"])
    pad = {"jpeg": b"", "label": np.int32(0)}
    describe = lambda i, key: f"{name} record {i}"
    return Split(size, epoch, lambda keys: keys, unpack, pad, describe, random_access=False)


def imagenet_source(cfg: ml_collections.ConfigDict) -> Source:
    """TFDS imagenet2012: random access when prepared as array_record, else TFRecord reading."""
    data_dir = os.path.expanduser(cfg.data_dir or "~/tensorflow_datasets")
    builder = tfds.builder("imagenet2012", data_dir=data_dir)

    def split(name: str, shuffle: bool) -> Split:
        try:
            return tfds_random_access(builder, name, shuffle)
        except NotImplementedError:  # TFRecord files, or nothing prepared
            pass
        try:
            seq = _tfds_sequential(builder, cfg, name, shuffle)
        except AssertionError as e:  # TFDS: "could not find data in ..."
            raise _imagenet_not_prepared(cfg, data_dir) from e
        logging.warning(
            "imagenet2012/%s is stored as TFRecord: every process reads every record, and a "
            "resumed run re-reads its epoch. `python -m alexnet_jax.prepare_imagenet` prepares "
            "array_record files instead (random access).",
            name,
        )
        return seq

    return Source(
        "imagenet2012",
        f"imagenet2012:{data_dir}",
        imagenet_class_names(),
        split(cfg.train_split, shuffle=True),
        split(cfg.eval_split, shuffle=False),
    )


def paper256_source(cfg: ml_collections.ConfigDict) -> Source:
    """ImageNet as the paper stored it (paper256.py), with its training set's statistics."""
    from alexnet_jax import paper256

    data_dir = cfg.data_dir or "~/tensorflow_datasets"
    if not staging.is_url(data_dir):
        data_dir = os.path.expanduser(data_dir)

    def not_prepared() -> UsageError:
        return UsageError(
            f"{paper256.NAME} is not prepared in {data_dir}. Put {' and '.join(IMAGENET_TARS)} "
            f"in a directory TARS and run once:\n  python -m alexnet_jax.prepare_imagenet "
            f"--form=paper256 --data_dir={data_dir} --manual_dir=TARS"
            + ("\n(then copy what it writes to the bucket)" if staging.is_url(data_dir) else "")
        )

    relative = f"{paper256.NAME}/{paper256.VERSION}"
    directory = staging.local_dataset(data_dir, relative, cfg.stage_dir, not_prepared)
    builder = tfds.builder_from_directory(str(directory))
    # Without fancy (interpolated) chroma upsampling, decoding only a crop window gives the
    # same pixels as decoding the whole image and cropping (input_pipeline's crop-only path).
    split = lambda name, shuffle: tfds_random_access(builder, name, shuffle, False)
    return Source(
        paper256.NAME,
        f"{paper256.NAME}:{directory}",
        imagenet_class_names(),
        split(cfg.train_split, shuffle=True),
        split(cfg.eval_split, shuffle=False),
        stats=json.loads((directory / "rgb_stats.json").read_text()),
        stored_size=paper256.SIZE,
        mean_image=np.load(directory / "mean_image.npy"),
    )


def imagenet_class_names() -> list[str]:
    path = Path(__file__).with_name("imagenet2012_classes.txt")
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch]).integers(2**31))


def create_source(cfg: ml_collections.ConfigDict, process_count: int = 1) -> Source:
    """The source named by `cfg.dataset` (the `input` part of the config), for a run of
    `process_count` processes."""
    if cfg.dataset == "digits":
        source = digits_source()
    elif cfg.dataset == "imagenet2012":
        source = imagenet_source(cfg)
    elif cfg.dataset == "imagenet2012_paper256":
        source = paper256_source(cfg)
    elif cfg.dataset == "imagefolder":
        source = imagefolder_source(cfg)
    else:
        raise UsageError(f"input.dataset={cfg.dataset!r} is unknown; use one of {DATASETS}.")
    if process_count > 1 and not (source.train.random_access and source.eval.random_access):
        raise UsageError(
            f"{cfg.dataset} is stored as TFRecord, which every one of the {process_count} "
            "processes would read whole. Prepare it as array_record (random access) with "
            "`python -m alexnet_jax.prepare_imagenet`, or train with one process."
        )
    return source
