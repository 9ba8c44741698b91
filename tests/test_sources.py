"""Data sources: the embedded digits, image folders, TFDS imagenet2012 (mock data)."""

import contextlib
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import write_folder

from alexnet_jax import UsageError, sources, transforms
from alexnet_jax import input_pipeline as ip


def _cfg(**kw):
    from configs import digits

    cfg = digits.get_config().input
    cfg.update(kw)
    return cfg


def _keys(split, epoch, seed=0, start=0):
    return [int(k) for k in split.epoch(epoch, seed, start)]


def test_the_digits_are_scikit_learns():
    from sklearn.datasets import load_digits

    data = load_digits()
    source = sources.digits_source()
    assert source.train.size + source.eval.size == len(data.target) == 1797
    assert source.class_names == [str(d) for d in range(10)]
    image, label = source.eval.decode(np.int64(0))
    image = image.numpy()
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 2])  # grey as RGB
    # The same digit, found among scikit-learn's by its pixels (0-16 scaled to 0-255).
    match = [
        i
        for i in range(len(data.target))
        if np.array_equal(np.round(data.images[i] * 255 / 16).astype(np.uint8), image[..., 0])
    ]
    assert match and all(data.target[i] == int(label) for i in match)


def test_image_folder_source(tmp_path):
    write_folder(tmp_path)
    source = sources.create_source(_cfg(dataset="imagefolder", data_dir=str(tmp_path)))
    assert source.class_names == ["cat", "dog"]
    assert source.train.size == 6 and source.eval.size == 6
    for split in (source.train, source.eval):
        labels = []
        for key in split.epoch(0, 0, 0):
            image, label = split.decode(key)
            assert int(image.numpy()[0, 0, 0]) // 40 == int(label)  # the folder's class
            labels.append(int(label))
        assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    p = transforms.Preprocess(transforms.IMAGENET_STATS, image_size=67, resize_size=72)
    ds = ip.train_dataset(source, p, seed=0, batch_size=4, start_step=0, num_steps=2)
    batches = list(ip.iterate(ds, source.train))
    assert len(batches) == 2 and batches[0]["images"].shape == (4, 67, 67, 3)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="needs --config.input.data_dir"):
        sources.create_source(_cfg(dataset="imagefolder", data_dir=None))
    with pytest.raises(UsageError, match="does not exist"):
        sources.create_source(_cfg(dataset="imagefolder", data_dir=str(tmp_path / "nope")))

    write_folder(tmp_path / "d")
    (tmp_path / "d" / "train" / "emu").mkdir()  # a class without images
    (tmp_path / "d" / "train" / "emu" / "notes.txt").write_text("no image")
    with pytest.raises(
        UsageError, match=r"1 class folder\(s\) under .* hold no images .*\['emu'\]"
    ):
        sources.create_source(_cfg(dataset="imagefolder", data_dir=str(tmp_path / "d")))


def test_imagenet_not_prepared_says_where_the_tars_go(tmp_path):
    cfg = _cfg(dataset="imagenet2012", data_dir=str(tmp_path), manual_dir=str(tmp_path / "m"))
    with pytest.raises(UsageError) as e:
        sources.create_source(cfg)
    msg = str(e.value)
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert f"python -m alexnet_jax.prepare_imagenet --data_dir={tmp_path}" in msg
    assert f"--manual_dir={tmp_path / 'm'}" in msg


@pytest.mark.parametrize("storage", ["array_record", "tfrecord"])
def test_imagenet_path_on_tfds_mock_data(storage, monkeypatch):
    # TFDS's mock data source binds its batched read without `self`; give it one that works.
    from tensorflow_datasets.testing import mocking

    batched_reads = []

    def getitems(keys, generator, serialized=False):
        batched_reads.append(len(keys))
        return [generator[k] for k in keys]

    monkeypatch.setattr(mocking, "_getitems", getitems)
    cfg = _cfg(dataset="imagenet2012", image_size=67, resize_size=72, data_dir="/nonexistent")
    p = transforms.Preprocess(transforms.IMAGENET_STATS, image_size=67, resize_size=72)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        no_random_access = mock.patch.object(  # what TFDS raises for TFRecord files
            tfds.core.DatasetBuilder, "as_data_source", side_effect=NotImplementedError
        )
        with no_random_access if storage == "tfrecord" else contextlib.nullcontext():
            source = sources.create_source(cfg)
            if storage == "tfrecord":
                with pytest.raises(UsageError, match="every one of the 4 processes would read"):
                    sources.create_source(cfg, process_count=4)
            else:
                assert sources.create_source(cfg, process_count=4).train.random_access
        random_access = source.train.random_access
        assert random_access == (storage == "array_record")
        assert source.num_classes == 1000 and source.class_names[0].startswith("tench")
        assert source.train.size == 12
        ds = ip.train_dataset(source, p, seed=0, batch_size=8, start_step=0, num_steps=3)
        batches = list(ip.iterate(ds, source.train))
        evals = list(ip.iterate(ip.eval_dataset(source, p, batch_size=8), source.eval))
    assert len(batches) == 3 and batches[0]["images"].shape == (8, 67, 67, 3)
    assert batches[0]["labels"].max() < 1000
    assert sum(b["weights"].sum() for b in evals) == 12
    if storage == "array_record":  # read a global batch per Python call, not an example
        assert batched_reads and set(batched_reads) == {8}


def test_data_dir_schemes_are_one_line_or_read_locally(tmp_path, monkeypatch):
    write_folder(tmp_path)
    local = sources.create_source(_cfg(dataset="imagefolder", data_dir=f"file://{tmp_path}"))
    assert local.class_names == ["cat", "dog"]  # file:// is a local path
    with pytest.raises(UsageError, match="an image folder is read from a local directory, not"):
        sources.create_source(_cfg(dataset="imagefolder", data_dir="gs://bucket/folder"))
    with pytest.raises(UsageError, match="only local paths and buckets"):
        sources.create_source(_cfg(dataset="imagenet2012_paper256", data_dir="ftp://host/x"))

    from etils import epath

    def offline(self):
        raise RuntimeError("Could not resolve host: storage.googleapis.com\nand more")

    monkeypatch.setattr(type(epath.Path("gs://bucket/x")), "exists", offline)
    with pytest.raises(UsageError) as e:
        sources.create_source(_cfg(dataset="imagenet2012_paper256", data_dir="gs://nobucket/x"))
    assert str(e.value).startswith(
        "input.data_dir=gs://nobucket/x could not be read (RuntimeError: Could not resolve host"
    )
    assert "\n" not in str(e.value)
