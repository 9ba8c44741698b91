"""Splits: per-epoch orders that are functions of (seed, epoch), resumable mid-epoch; splits
with keys left out; image-file splits and their contents digest."""

import numpy as np
import pytest
from conftest import write_folder

from alexnet_jax import UsageError, sources, splits


def _keys(split, epoch, seed=0, start=0):
    return [int(k) for k in split.epoch(epoch, seed, start)]


def test_each_epoch_is_its_own_permutation_of_the_split():
    split = sources.digits_source().train
    e0, e1, again = _keys(split, 0), _keys(split, 1), _keys(split, 0)
    assert sorted(e0) == sorted(e1) == list(range(split.size))  # every example once
    assert e0 == again  # a function of (seed, epoch)
    assert e0 != e1  # a new order every epoch
    assert _keys(split, 0, seed=1) != e0  # and every seed
    assert _keys(split, 1, start=100) == e1[100:]  # resumable mid-epoch


def test_the_held_out_split_is_in_order_and_fixed():
    held_out = sources.digits_source().eval
    assert _keys(held_out, 0) == _keys(held_out, 3, seed=5) == list(range(360))


def test_a_split_without_some_keys_keeps_each_epochs_order_of_the_rest():
    split = sources.digits_source().train
    kept = split.without([3, 100, 7])
    assert kept.size == split.size - 3
    e1 = _keys(kept, 1)
    assert e1 == [k for k in _keys(split, 1) if k not in (3, 100, 7)]
    assert _keys(kept, 1, start=50) == e1[50:]  # a resumed run sees the rest in order
    # Everything else is the split's own.
    image, label = kept.decode(np.int64(5))
    want_image, want_label = split.decode(np.int64(5))
    np.testing.assert_array_equal(image, want_image)
    assert int(label) == int(want_label)
    assert split.without([]) is split


def test_an_array_split_decodes_its_rows():
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    split = splits.ArraySplit(images, np.array([3, 1, 4, 1]), shuffle=False)
    assert not np.array_equal(images[1], images[2])
    for i in range(4):
        image, label = split.decode(np.int64(i))
        np.testing.assert_array_equal(image, images[i])
        assert int(label) == [3, 1, 4, 1][i]
    assert split.describe(0, np.int64(2)) == "example 2"
    assert split.contents() is None and not split.stores_jpeg
    with pytest.raises(NotImplementedError, match="ArraySplit stores no JPEGs"):
        split.jpeg(None)


def test_a_folder_split_names_its_files_and_goes_stale_with_them(tmp_path):
    write_folder(tmp_path, ("a", "b"), per_class=3)
    split = splits.FolderSplit(tmp_path / "train", ["a", "b"], shuffle=True)
    assert split.size == 6
    keys = _keys(split, 0)
    assert keys != sorted(keys)
    for k in keys:  # each pixel tells the label (conftest.write_folder)
        image, label = split.decode(np.int64(k))
        assert int(image.numpy()[0, 0, 0]) // 40 == int(label)
        assert f"/{'ab'[int(label)]}/" in split.describe(0, np.int64(k))
    before = split.contents()
    (tmp_path / "train" / "b" / "0.png").unlink()
    after = splits.FolderSplit(tmp_path / "train", ["a", "b"], shuffle=True)
    assert after.size == 5 and after.contents() != before


def test_a_folder_split_refuses_an_empty_class(tmp_path):
    write_folder(tmp_path, ("a",), per_class=2)
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(UsageError, match=r"1 class folder\(s\) under .* hold no images"):
        splits.FolderSplit(tmp_path / "train", ["a", "b"], shuffle=True)
    held_out = splits.FolderSplit(tmp_path / "train", ["a", "b"], shuffle=False)
    assert held_out.size == 2  # the held-out split may lack a class
