"""Input pipeline: augmentation geometry and statistics, determinism, eval padding, sources."""

from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax import UsageError, sources
from alexnet_jax import input_pipeline as ip


def _cfg(**kw) -> ml_collections.ConfigDict:
    from configs import digits

    cfg = digits.get_config().input
    cfg.image_size, cfg.resize_size, cfg.divide_by_std = 67, 72, False
    cfg.update(kw)
    return cfg


def _coords_image(size: int) -> tf.Tensor:
    """A square image whose R and G channels hold the row and column of each pixel."""
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return tf.constant(np.stack([r, c, np.zeros_like(r)], -1).astype(np.float32))


def test_resize_square_takes_the_central_square():
    image = tf.zeros([40, 100, 3], tf.uint8)
    out = ip.resize_square(image, 20)
    assert out.shape == (20, 20, 3)


def test_random_crop_and_flip_geometry():
    cfg = _cfg(resize_size=32, image_size=24, random_flip=True, pca_lighting_std=0.0)
    stats = ip.Stats((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    image = _coords_image(32)
    tops, flips = set(), 0
    for i in range(64):
        out = ip.train_preprocess(image, tf.constant([0, i], tf.int64), stats, cfg).numpy()
        rows, cols = out[..., 0], out[..., 1]
        assert np.all(np.diff(rows, axis=0) == 1)  # a contiguous window
        top, left = rows[0, 0], min(cols[0, 0], cols[0, -1])
        assert 0 <= top <= 8 and 0 <= left <= 8  # inside the 32x32 square
        flipped = cols[0, 0] > cols[0, -1]
        flips += flipped
        np.testing.assert_array_equal(np.abs(np.diff(cols, axis=1)), 1)
        tops.add(top)
    assert len(tops) > 4  # the crop moves
    assert 16 < flips < 48  # about half are mirrored


def test_pca_lighting_statistics():
    """The colour shift is 255 * V @ (alpha * lambda), alpha ~ N(0, 0.1): its covariance is
    255^2 V diag(0.01 lambda^2) V^T."""
    stats = ip.IMAGENET_STATS
    shifts = np.stack(
        [
            ip.pca_lighting(tf.zeros([1, 1, 3]), stats, 0.1, tf.constant([7, i], tf.int64))
            .numpy()
            .reshape(3)
            for i in range(4000)
        ]
    )
    v, lam = np.asarray(stats.eigvec), np.asarray(stats.eigval)
    want = 255.0**2 * v @ np.diag((0.1 * lam) ** 2) @ v.T
    np.testing.assert_allclose(np.cov(shifts.T), want, rtol=0.1, atol=0.02 * want.max())
    np.testing.assert_allclose(shifts.mean(0), 0.0, atol=0.1 * np.sqrt(want.max()))
    # Along the luminance eigenvector (column 0): std 255 * 0.1 * 0.2175 ~ 5.5 grey levels.
    along = shifts @ v[:, 0]
    assert abs(along.std() - 255 * 0.1 * 0.2175) < 0.3


def test_ten_crops_are_corners_centre_and_mirrors():
    crops = ip.ten_crops(_coords_image(10), 6).numpy()
    assert crops.shape == (10, 6, 6, 3)
    corners = [(c[0, 0, 0], c[0, 0, 1]) for c in crops[:5]]
    assert corners == [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
    np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])


def test_eval_ten_crop_output(tiny):
    cfg = _cfg(eval_ten_crop=True)
    stats = ip.Stats((1.0, 2.0, 3.0), (0.0,) * 3, ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    out = ip.eval_preprocess(tf.fill([80, 90, 3], tf.constant(10, tf.uint8)), stats, cfg)
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
    cfg = _cfg()
    a = ip.get_stats(source, cfg, str(tmp_path))
    assert (tmp_path / "input_stats.json").exists()
    assert ip.get_stats(source, cfg, str(tmp_path)) == a
    cfg.resize_size = 80  # another key: recomputed
    assert ip.get_stats(source, cfg, str(tmp_path)) != a


def _stream(source, cfg, start, steps, seed=0, index=0, count=1, batch=32):
    ds = ip.train_dataset(
        source,
        cfg,
        ip.IMAGENET_STATS,
        seed=seed,
        batch_size=batch,
        start_step=start,
        num_steps=steps,
        process_index=index,
        process_count=count,
    )
    return list(ip.iterate(ds, source.train))


def test_train_stream_is_a_function_of_seed_and_step():
    source, cfg = sources.digits_source(), _cfg()
    full = _stream(source, cfg, 0, 50)  # crosses an epoch boundary (1437 / 32 = 44.9)
    assert len(full) == 50
    again = _stream(source, cfg, 0, 50)
    resumed = _stream(source, cfg, 43, 50)
    other = _stream(source, cfg, 0, 2, seed=1)
    assert not np.array_equal(other[0]["images"], full[0]["images"])
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
    for a, b in zip(full[43:], resumed, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_each_process_gets_its_slice_of_the_global_batch():
    source, cfg = sources.digits_source(), _cfg()
    full = _stream(source, cfg, 0, 2)
    parts = [_stream(source, cfg, 0, 2, index=i, count=4) for i in range(4)]
    for step in range(2):
        glued = np.concatenate([p[step]["labels"] for p in parts])
        np.testing.assert_array_equal(glued, full[step]["labels"])


@pytest.mark.parametrize("count", [1, 2])
def test_eval_counts_every_example_once(count):
    source, cfg = sources.digits_source(), _cfg()
    labels, weights = [], []
    for index in range(count):
        ds = ip.eval_dataset(
            source, cfg, ip.IMAGENET_STATS, batch_size=64, process_index=index, process_count=count
        )
        batches = list(ip.iterate(ds, source.eval))
        assert len(batches) == 6  # ceil(360 / 64), the same on every process
        labels.append(np.concatenate([b["labels"] for b in batches]))
        weights.append(np.concatenate([b["weights"] for b in batches]))
    w = np.concatenate(weights)
    assert w.sum() == 360 == source.eval.size
    assert set(np.unique(w)) == {0.0, 1.0}


def _write_folder(root: Path, classes=("cat", "dog"), per_class=3, bad=None):
    for split in ("train", "validation"):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                img = np.full((20 + i, 30, 3), 40 * k + i, np.uint8)
                (d / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
    if bad:
        (root / "train" / classes[0] / bad).write_bytes(b"not an image at all")


def test_image_folder_source(tmp_path):
    _write_folder(tmp_path)
    source = sources.create_source(_cfg(dataset="imagefolder", data_dir=str(tmp_path)))
    assert source.class_names == ["cat", "dog"]
    assert source.train.size == 6 and source.eval.size == 6
    batches = _stream(source, _cfg(), 0, 2, batch=4)
    assert batches[0]["images"].shape == (4, 67, 67, 3)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="needs --config.input.data_dir"):
        sources.create_source(_cfg(dataset="imagefolder", data_dir=None))
    with pytest.raises(UsageError, match="does not exist"):
        sources.create_source(_cfg(dataset="imagefolder", data_dir=str(tmp_path / "nope")))


def test_a_corrupt_image_is_named(tmp_path):
    _write_folder(tmp_path, bad="broken.jpg")
    source = sources.create_source(_cfg(dataset="imagefolder", data_dir=str(tmp_path)))
    with pytest.raises(UsageError, match="broken.jpg"):
        _stream(source, _cfg(), 0, 4, batch=4)


def test_imagenet_not_prepared_says_where_the_tars_go(tmp_path):
    cfg = _cfg(dataset="imagenet2012", data_dir=str(tmp_path), manual_dir=str(tmp_path / "m"))
    with pytest.raises(UsageError) as e:
        sources.create_source(cfg)
    msg = str(e.value)
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert f"python -m alexnet_jax.prepare_imagenet --data_dir={tmp_path}" in msg
    assert f"--manual_dir={tmp_path / 'm'}" in msg


def test_prepare_imagenet(tmp_path):
    import tensorflow_datasets as tfds

    from alexnet_jax import prepare_imagenet

    with pytest.raises(UsageError, match="lacks ILSVRC2012_img_train.tar and ILSVRC2012_img_val"):
        prepare_imagenet.prepare(str(tmp_path / "data"), str(tmp_path))
    for tar in sources.IMAGENET_TARS:
        (tmp_path / tar).write_bytes(b"")
    with tfds.testing.mock_data(num_examples=4):  # download_and_prepare is mocked
        assert prepare_imagenet.prepare(str(tmp_path), str(tmp_path)).name == "imagenet2012"


@pytest.mark.parametrize("storage", ["array_record", "tfrecord"])
def test_imagenet_path_on_tfds_mock_data(storage):
    import contextlib
    from unittest import mock

    import tensorflow_datasets as tfds

    cfg = _cfg(dataset="imagenet2012", image_size=67, resize_size=72, data_dir="/nonexistent")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        no_random_access = mock.patch.object(  # what TFDS raises for TFRecord files
            tfds.core.DatasetBuilder, "as_data_source", side_effect=NotImplementedError
        )
        with no_random_access if storage == "tfrecord" else contextlib.nullcontext():
            source = sources.create_source(cfg)
        random_access = isinstance(source.train.pad_key, np.int64)
        assert random_access == (storage == "array_record")
        assert source.num_classes == 1000 and source.class_names[0].startswith("tench")
        assert source.train.size == 12
        batches = _stream(source, cfg, 0, 3, batch=8)
        ds = ip.eval_dataset(source, cfg, ip.IMAGENET_STATS, batch_size=8)
        evals = list(ip.iterate(ds, source.eval))
    assert len(batches) == 3 and batches[0]["images"].shape == (8, 67, 67, 3)
    assert batches[0]["labels"].max() < 1000
    assert sum(b["weights"].sum() for b in evals) == 12


def test_processes_read_disjoint_examples():
    """Random-access sources read only this process's rows of each global batch."""
    images = np.arange(40 * 4 * 4 * 3, dtype=np.int64).reshape(40, 4, 4, 3).astype(np.uint8)

    def source_logging_reads(log):
        def read_np(i):
            log.append(int(i))
            return images[int(i)], np.int32(i)

        def read(i):
            image, label = tf.numpy_function(read_np, [i], (tf.uint8, tf.int32))
            return tf.ensure_shape(image, [4, 4, 3]), tf.ensure_shape(label, [])

        split = sources._indexed_split(40, read, True, lambda i, key: str(key))
        return sources.Source("logged", "logged", ["x"] * 40, split, split)

    cfg = _cfg(resize_size=4, image_size=4, pca_lighting_std=0.0)
    reads, labels = [], []
    for index in range(2):
        log = []
        src = source_logging_reads(log)
        ds = ip.train_dataset(
            src,
            cfg,
            ip.IMAGENET_STATS,
            seed=0,
            batch_size=8,
            start_step=0,
            num_steps=3,
            process_index=index,
            process_count=2,
        )
        labels.append(np.concatenate([b["labels"] for b in ip.iterate(ds, src.train)]))
        reads.append(set(log))
    order = (
        sources._permutation(40, 0, 0).numpy().reshape(5, 2, 4)
    )  # epoch 0: 5 global batches of 2 x 4
    for index in range(2):
        own = set(order[:, index].ravel().tolist())  # this process's rows of every batch
        assert reads[index] <= own  # tf.data may read ahead, but only its own rows
        assert set(labels[index]) == set(order[:3, index].ravel().tolist())
    assert reads[0].isdisjoint(reads[1])
