"""Input pipeline: augmentation geometry and statistics, the train stream's determinism and
per-process slices, eval padding, undecodable images."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from conftest import write_folder

from alexnet_jax import UsageError, sources
from alexnet_jax import input_pipeline as ip

IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def _pre(**kw) -> ip.Preprocess:
    """The digits demo's transform at 67x67 (no flips, no lighting), with `kw` changed."""
    return dataclasses.replace(ip.Preprocess(ip.IMAGENET_STATS, 67, 72), **kw)


def _coords_image(size: int) -> tf.Tensor:
    """A square image whose R and G channels hold the row and column of each pixel."""
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return tf.constant(np.stack([r, c, np.zeros_like(r)], -1).astype(np.uint8))


@pytest.mark.parametrize("shape", [(40, 100), (100, 40)])
def test_resize_square_takes_the_central_square(shape):
    """Shorter side 40 -> 20 halves the image; the central 20x20 of the 20x50 (or 50x20)
    result covers the original's central 40x40: rows/columns 30-70 of the long side."""
    h, w = shape
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = tf.constant(np.stack([r, c, np.zeros_like(r)], -1).astype(np.uint8))
    out = ip.resize_square(image, 20).numpy().astype(np.float32)
    assert out.shape == (20, 20, 3)
    rows, cols = out[..., 0], out[..., 1]
    long_axis = cols if w > h else rows
    short_axis = rows if w > h else cols
    # Interior pixels (away from the antialiasing at the border) sit at 2 * i + 0.5.
    np.testing.assert_allclose(long_axis.mean(), 49.5, atol=0.5)  # centred on the long side
    np.testing.assert_allclose(short_axis.mean(), 19.5, atol=0.5)  # all of the short side
    assert 29 <= long_axis.min() and long_axis.max() <= 71  # the central square only


def test_random_crop_and_flip_geometry():
    stats = ip.Stats((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), IDENTITY)
    p = ip.Preprocess(stats, image_size=24, resize_size=32, random_flip=True)
    image = _coords_image(32)
    offsets, flips, shifts = ip.train_draws(0, tf.constant(0, tf.int64), 64, p)
    crops = tf.stack([ip.train_crop(image, o, p) for o in offsets])
    out = ip.finish(crops, offsets, flips, shifts, p)["images"].numpy()
    # For the device, the same windows travel unmirrored, with their mirror flags.
    raw = ip.finish(crops, offsets, flips, shifts, dataclasses.replace(p, on_device=True))
    assert raw["images"].dtype == tf.uint8
    mirror = raw["crops"].numpy()[:, 2, None, None, None] > 0
    images = raw["images"].numpy()
    assert not np.array_equal(images, out)
    np.testing.assert_array_equal(np.where(mirror, images[:, :, ::-1], images), out)
    tops, mirrored = set(), 0
    for i in range(64):
        rows, cols = out[i, ..., 0], out[i, ..., 1]
        assert np.all(np.diff(rows, axis=0) == 1)  # a contiguous window
        top, left = rows[0, 0], min(cols[0, 0], cols[0, -1])
        assert 0 <= top <= 8 and 0 <= left <= 8  # inside the 32x32 square
        flipped = cols[0, 0] > cols[0, -1]
        mirrored += flipped
        assert tuple(raw["crops"][i].numpy()) == (top, left, flipped)
        np.testing.assert_array_equal(np.abs(np.diff(cols, axis=1)), 1)
        tops.add(top)
    assert len(tops) > 4  # the crop moves
    assert 16 < mirrored < 48  # about half are mirrored
    # Another step draws anew; the same step draws the same.
    again, other = (ip.train_draws(0, tf.constant(s, tf.int64), 64, p)[0] for s in (0, 1))
    np.testing.assert_array_equal(again, offsets)
    assert not np.array_equal(other, offsets)


def test_pca_lighting_statistics():
    """The colour shift is 255 * V @ (alpha * lambda), alpha ~ N(0, 0.1): its covariance is
    255^2 V diag(0.01 lambda^2) V^T."""
    stats = ip.IMAGENET_STATS
    shifts = ip.lighting_shifts(stats, 0.1, tf.constant([7, 1], tf.int64), 4000).numpy()
    v, lam = np.asarray(stats.eigvec), np.asarray(stats.eigval)
    want = 255.0**2 * v @ np.diag((0.1 * lam) ** 2) @ v.T
    np.testing.assert_allclose(np.cov(shifts.T), want, rtol=0.1, atol=0.02 * want.max())
    np.testing.assert_allclose(shifts.mean(0), 0.0, atol=0.1 * np.sqrt(want.max()))
    # Along the luminance eigenvector (column 0): std 255 * 0.1 * 0.2175 ~ 5.5 grey levels.
    along = shifts @ v[:, 0]
    assert abs(along.std() - 255 * 0.1 * 0.2175) < 0.3


def test_ten_crops_are_corners_centre_and_mirrors():
    crops, where = (t.numpy() for t in ip.ten_crops(_coords_image(10), 6))
    assert crops.shape == (10, 6, 6, 3)
    corners = [(c[0, 0, 0], c[0, 0, 1]) for c in crops[:5]]
    assert corners == [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
    assert where.tolist() == [[t, left, f] for f in (0, 1) for t, left in corners]
    # Normalising (here with a zero mean) mirrors the last five.
    zero = ip.Stats((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), IDENTITY)
    p = ip.Preprocess(zero, image_size=6, resize_size=10)
    out = ip.normalize(crops, where, tf.zeros([10, 3]), p).numpy()
    np.testing.assert_array_equal(out[:5], crops[:5])
    assert not np.array_equal(out[5:], out[:5])
    np.testing.assert_array_equal(out[5:], crops[:5, :, ::-1])


def test_eval_ten_crop_output():
    p = _pre(stats=ip.Stats((1.0, 2.0, 3.0), (0.0,) * 3, IDENTITY), ten_crop=True)
    out = ip.eval_preprocess(tf.fill([80, 90, 3], tf.constant(10, tf.uint8)), p)["images"]
    assert out.shape == (10, 67, 67, 3)
    np.testing.assert_allclose(out.numpy()[..., 2], 7.0, atol=1e-4)  # mean subtracted


def test_stats_of_the_training_split_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3)).astype(np.uint8)
    split = sources._array_split(images, np.zeros(20, np.int64), shuffle=True)
    stats = ip.compute_stats(split, 8, 100)
    pixels = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats.mean, pixels.mean(0), rtol=1e-6)
    cov = np.cov((pixels / 255).T, bias=True)
    v, lam = np.asarray(stats.eigvec), np.asarray(stats.eigval)
    np.testing.assert_allclose(v @ np.diag(lam) @ v.T, cov, atol=1e-9)
    assert lam[0] >= lam[1] >= lam[2]
    np.testing.assert_allclose(stats.std(), pixels.std(0), rtol=1e-6)


def test_stats_are_cached_in_the_workdir(tmp_path):
    source = sources.digits_source()
    a = ip.get_stats(source, 72, 10_000, str(tmp_path))
    assert (tmp_path / "input_stats.json").exists()
    assert ip.get_stats(source, 72, 10_000, str(tmp_path)) == a
    assert ip.get_stats(source, 80, 10_000, str(tmp_path)) != a  # another key: recomputed


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

    def read(i):
        image, label = tf.numpy_function(read_np, [i], (tf.uint8, tf.int32))
        return tf.ensure_shape(image, [4, 4, 3]), tf.ensure_shape(label, [])

    split = sources._indexed_split(n, read, True, lambda i, key: str(key))
    held_out = sources._indexed_split(n, read, False, lambda i, key: str(key))
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
        ip.get_stats(source, 72, 100, None)  # the statistics pass, before any training


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
        sources._permutation(40, 0, 0).numpy().reshape(5, 2, 4)
    )  # epoch 0: 5 global batches of 2 x 4
    for index in range(2):
        own = set(order[:, index].ravel().tolist())  # this process's rows of every batch
        assert reads[index] <= own  # tf.data may read ahead, but only its own rows
        assert set(labels[index]) == set(order[:3, index].ravel().tolist())
    assert reads[0].isdisjoint(reads[1])
