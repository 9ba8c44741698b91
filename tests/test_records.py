"""TFDS's records as splits: array_record shards read by index as TFDS reads them, parsed a
batch at a time, their JPEGs handed over undecoded."""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from test_paper256 import prepared  # noqa: F401  (the prepared paper-256 fixture)

from alexnet_jax import records


def test_records_are_read_straight_from_the_shards_as_tfds_reads_them(prepared):  # noqa: F811
    directory = prepared[2]
    builder = tfds.builder_from_directory(str(directory))
    files = records.array_record_files(builder, "train")
    assert files is not None and len(files) > 1  # keys cross shards
    from array_record.python.array_record_module import ArrayRecordReader

    for f in files:  # a record per chunk, not compressed (JPEGs do not compress)
        options = ArrayRecordReader(str(f.filename)).writer_options_string().split(",")
        assert "group_size:1" in options and "uncompressed" in options, options
    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    tfds_source = builder.as_data_source(split="train", deserialize_method=raw)
    keys = np.random.default_rng(0).permutation(len(tfds_source))
    got = records.ArrayRecordRows(files).read(keys)
    want = tfds_source.__getitems__([int(k) for k in keys])
    assert len(set(got)) == len(keys)  # distinct records, in the keys' order
    assert list(got) == list(want)


def test_a_record_split_reads_parses_and_names_its_records(prepared):  # noqa: F811
    builder = tfds.builder_from_directory(str(prepared[2]))
    split = records.RecordSplit(builder, "train", shuffle=True)
    assert split.stores_jpeg and split.random_access and split.size == 12
    keys = tf.constant([5, 0, 11], tf.int64)
    jpegs, labels = split.jpeg(split.fetch(keys))
    source = builder.as_data_source(split="train")
    for jpeg, label, k in zip(jpegs.numpy(), labels.numpy(), (5, 0, 11), strict=True):
        assert jpeg[:2] == b"\xff\xd8"  # a JPEG, undecoded
        assert label == source[k]["label"]
    image, label = split.decode(np.int64(5))
    assert image.shape == (256, 256, 3) and int(label) == source[5]["label"]
    assert split.describe(0, tf.constant(5, tf.int64)) == "train record 5"
    assert split.contents() is not None
    wide = records.RecordSplit(builder, "train", shuffle=True, fancy_upscaling=False)
    assert not np.array_equal(wide.decode(np.int64(5))[0], image)  # chroma not interpolated
