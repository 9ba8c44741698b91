"""The tf.data streams: the train stream's determinism and per-process slices, its threads,
eval padding, undecodable images named."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from conftest import write_folder

from alexnet_jax import UsageError, input_stats, sources, splits, transforms
from alexnet_jax import input_pipeline as ip


def _pre(**kw) -> transforms.Preprocess:
    """The digits demo's transform at 67x67 (no flips, no lighting), with `kw` changed."""
    return dataclasses.replace(transforms.Preprocess(transforms.IMAGENET_STATS, 67, 72), **kw)


def _stream(source, p, start, steps, seed=0, rows=None, batch=32):
    ds = ip.train_dataset(
        source, p, seed=seed, batch_size=batch, start_step=start, num_steps=steps, rows=rows
    )
    return list(ip.iterate(ds, source.train))


def test_train_stream_is_a_function_of_seed_and_step():
    source, p = sources.digits_source(), _pre()
    full = _stream(source, p, 0, 50)  # crosses an epoch boundary (1437 / 32 = 44.9)
    assert len(full) == 50
    again = _stream(source, p, 0, 50)
    resumed = _stream(source, p, 43, 50)
    other = _stream(source, p, 0, 2, seed=1)
    assert not np.array_equal(other[0]["images"], full[0]["images"])
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
    for a, b in zip(full[43:], resumed, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_the_streams_run_on_the_threads_they_are_given():
    source, p = sources.digits_source(), _pre()
    train = ip.train_dataset(source, p, seed=0, batch_size=8, start_step=0, num_steps=1, threads=3)
    evals = ip.eval_dataset(source, p, batch_size=8, threads=3)
    for ds in (train, evals):
        assert ds.options().threading.private_threadpool_size == 3
        assert ds.options().threading.max_intra_op_parallelism == 1
    assert len(list(ip.iterate(train, source.train))) == 1


@pytest.mark.parametrize("threads", [None, 2])
def test_the_streams_run_without_the_autotuner(threads):
    """Destroying a stream's iterator waits for tf.data's autotuner thread, which stalled the
    end of some runs by half a minute: every stream sets its parallelism itself."""
    source, p = sources.digits_source(), _pre()
    train = ip.train_dataset(
        source, p, seed=0, batch_size=8, start_step=0, num_steps=3, threads=threads
    )
    evals = ip.eval_dataset(source, p, batch_size=8, threads=threads)
    default = tf.data.Dataset.range(3).map(lambda x: x, num_parallel_calls=2)
    assert default.options().autotune.enabled is not False  # on unless a stream turns it off
    for ds in (train, evals):
        assert ds.options().autotune.enabled is False
    assert len(list(ip.iterate(train, source.train))) == 3


def test_each_process_reads_its_rows_of_the_global_batch():
    source, p = sources.digits_source(), _pre()
    full = _stream(source, p, 0, 2)
    assert not np.array_equal(full[0]["labels"], full[1]["labels"])
    parts = [_stream(source, p, 0, 2, rows=np.arange(8 * i, 8 * i + 8)) for i in range(4)]
    scattered = _stream(source, p, 0, 2, rows=[3, 17, 30])  # any rows, in order
    for step in range(2):
        glued = np.concatenate([p[step]["labels"] for p in parts])
        np.testing.assert_array_equal(glued, full[step]["labels"])
        np.testing.assert_array_equal(scattered[step]["images"], full[step]["images"][[3, 17, 30]])


def _indexed_source(n, log=None):
    """n tiny examples whose label is their index; `log` collects the indices read."""
    images = np.arange(n * 4 * 4 * 3, dtype=np.int64).reshape(n, 4, 4, 3).astype(np.uint8)

    def read_np(i):
        if log is not None:
            log.append(int(i))
        return images[int(i)], np.int32(i)

    class Logged(splits.IndexedSplit):
        def unpack(self, i):
            image, label = tf.numpy_function(read_np, [i], (tf.uint8, tf.int32))
            return tf.ensure_shape(image, [4, 4, 3]), tf.ensure_shape(label, [])

    split, held_out = Logged(n, shuffle=True), Logged(n, shuffle=False)
    return sources.Source("indexed", "indexed", ["x"] * n, split, held_out)


@pytest.mark.parametrize("count", [1, 2])
def test_eval_counts_every_example_once(count):  # count processes, each reading its half
    source = _indexed_source(37)  # not a multiple of the batch of 8
    p = _pre(image_size=4, resize_size=4)
    labels, weights, batches_seen = [], [], []
    for index in range(count):
        rows = np.arange(index * 8 // count, (index + 1) * 8 // count)
        ds = ip.eval_dataset(source, p, batch_size=8, rows=rows)
        batches = list(ip.iterate(ds, source.eval))
        batches_seen.append(len(batches))
        for b in batches:
            labels += b["labels"][b["weights"] == 1].tolist()
            weights += b["weights"].tolist()
    assert batches_seen == [5] * count  # ceil(37 / 8), the same on every process
    assert set(weights) == {0.0, 1.0} and sum(weights) == 37 == source.eval.size
    assert sorted(labels) == list(range(37))  # each example exactly once


def test_a_corrupt_image_is_named(tmp_path):
    from configs import digits

    write_folder(tmp_path, bad="broken.jpg")
    cfg = digits.get_config().input
    cfg.dataset, cfg.data_dir = "imagefolder", str(tmp_path)
    source = sources.create_source(cfg)
    with pytest.raises(UsageError, match="broken.jpg"):
        _stream(source, _pre(), 0, 4, batch=4)
    with pytest.raises(UsageError, match=r"could not be decoded: .*train/cat/broken\.jpg"):
        input_stats.get_stats(source, 72, 100, None)  # the statistics pass, before any training


def test_every_epoch_of_the_stream_has_its_own_order():
    log = []
    source = _indexed_source(32, log)
    p = _pre(image_size=4, resize_size=4)
    batches = _stream(source, p, 0, 8, batch=8)  # two epochs of four batches
    labels = np.concatenate([b["labels"] for b in batches])
    first, second = labels[:32].tolist(), labels[32:].tolist()
    assert sorted(first) == sorted(second) == list(range(32))
    assert first != second


def test_processes_read_disjoint_examples():
    """Random-access sources read only this process's rows of each global batch."""
    p = _pre(image_size=4, resize_size=4)
    reads, labels = [], []
    for index in range(2):
        log = []
        src = _indexed_source(40, log)
        batches = _stream(src, p, 0, 3, rows=np.arange(4 * index, 4 * index + 4), batch=8)
        labels.append(np.concatenate([b["labels"] for b in batches]))
        reads.append(set(log))
    order = (
        splits.permutation(40, 0, 0).numpy().reshape(5, 2, 4)
    )  # epoch 0: 5 global batches of 2 x 4
    for index in range(2):
        own = set(order[:, index].ravel().tolist())  # this process's rows of every batch
        assert reads[index] <= own  # tf.data may read ahead, but only its own rows
        assert set(labels[index]) == set(order[:3, index].ravel().tolist())
    assert reads[0].isdisjoint(reads[1])
