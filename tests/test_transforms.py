"""The paper's transforms: the central square, the train crop's geometry and mirror, PCA
lighting's statistics, the ten patches."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax import transforms

IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def _pre(**kw) -> transforms.Preprocess:
    """The digits demo's transform at 67x67 (no flips, no lighting), with `kw` changed."""
    return dataclasses.replace(transforms.Preprocess(transforms.IMAGENET_STATS, 67, 72), **kw)


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
    out = transforms.resize_square(image, 20).numpy().astype(np.float32)
    assert out.shape == (20, 20, 3)
    rows, cols = out[..., 0], out[..., 1]
    long_axis = cols if w > h else rows
    short_axis = rows if w > h else cols
    # Interior pixels (away from the antialiasing at the border) sit at 2 * i + 0.5.
    np.testing.assert_allclose(long_axis.mean(), 49.5, atol=0.5)  # centred on the long side
    np.testing.assert_allclose(short_axis.mean(), 19.5, atol=0.5)  # all of the short side
    assert 29 <= long_axis.min() and long_axis.max() <= 71  # the central square only


def test_random_crop_and_flip_geometry():
    stats = transforms.Stats((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), IDENTITY)
    p = transforms.Preprocess(stats, image_size=24, resize_size=32, random_flip=True)
    image = _coords_image(32)
    offsets, flips, shifts = transforms.train_draws(0, tf.constant(0, tf.int64), 64, p)
    crops = tf.stack([transforms.train_crop(image, o, p) for o in offsets])
    out = transforms.finish(crops, offsets, flips, shifts, p)["images"].numpy()
    # For the device, the same windows travel unmirrored, with their mirror flags.
    raw = transforms.finish(crops, offsets, flips, shifts, dataclasses.replace(p, on_device=True))
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
    again, other = (transforms.train_draws(0, tf.constant(s, tf.int64), 64, p)[0] for s in (0, 1))
    np.testing.assert_array_equal(again, offsets)
    assert not np.array_equal(other, offsets)


def test_pca_lighting_statistics():
    """The colour shift is 255 * V @ (alpha * lambda), alpha ~ N(0, 0.1): its covariance is
    255^2 V diag(0.01 lambda^2) V^T."""
    stats = transforms.IMAGENET_STATS
    shifts = transforms.lighting_shifts(stats, 0.1, tf.constant([7, 1], tf.int64), 4000).numpy()
    v, lam = np.asarray(stats.eigvec), np.asarray(stats.eigval)
    want = 255.0**2 * v @ np.diag((0.1 * lam) ** 2) @ v.T
    np.testing.assert_allclose(np.cov(shifts.T), want, rtol=0.1, atol=0.02 * want.max())
    np.testing.assert_allclose(shifts.mean(0), 0.0, atol=0.1 * np.sqrt(want.max()))
    # Along the luminance eigenvector (column 0): std 255 * 0.1 * 0.2175 ~ 5.5 grey levels.
    along = shifts @ v[:, 0]
    assert abs(along.std() - 255 * 0.1 * 0.2175) < 0.3


def test_ten_crops_are_corners_centre_and_mirrors():
    crops, where = (t.numpy() for t in transforms.ten_crops(_coords_image(10), 6))
    assert crops.shape == (10, 6, 6, 3)
    corners = [(c[0, 0, 0], c[0, 0, 1]) for c in crops[:5]]
    assert corners == [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
    assert where.tolist() == [[t, left, f] for f in (0, 1) for t, left in corners]
    # Normalising (here with a zero mean) mirrors the last five.
    zero = transforms.Stats((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), IDENTITY)
    p = transforms.Preprocess(zero, image_size=6, resize_size=10)
    out = transforms.normalize(crops, where, tf.zeros([10, 3]), p).numpy()
    np.testing.assert_array_equal(out[:5], crops[:5])
    assert not np.array_equal(out[5:], out[:5])
    np.testing.assert_array_equal(out[5:], crops[:5, :, ::-1])


def test_eval_ten_crop_output():
    p = _pre(stats=transforms.Stats((1.0, 2.0, 3.0), (0.0,) * 3, IDENTITY), ten_crop=True)
    out = transforms.eval_preprocess(tf.fill([80, 90, 3], tf.constant(10, tf.uint8)), p)["images"]
    assert out.shape == (10, 67, 67, 3)
    np.testing.assert_allclose(out.numpy()[..., 2], 7.0, atol=1e-4)  # mean subtracted


@pytest.mark.parametrize("ten_crop", [False, True])
def test_the_centre_of_an_odd_margin_is_cut_where_the_paper_cuts_it(ten_crop):
    """256 - 227 = 29 pixels to share: 14 above and left of the centre crop, 15 below and
    right, in the single centre crop, in the ten patches' centre and in DALI's windows."""
    p = _pre(image_size=227, resize_size=256, ten_crop=ten_crop, on_device=True)
    out = transforms.eval_preprocess(_coords_image(256), p)
    images, where = out["images"].numpy(), out["crops"].numpy()
    centre = images[4] if ten_crop else images
    assert (centre[0, 0, 0], centre[0, 0, 1]) == (14, 14)
    assert (centre[-1, -1, 0], centre[-1, -1, 1]) == (240, 240)  # 256 - 1 - 15
    windows = transforms.eval_windows(256, 227, ten_crop)
    np.testing.assert_array_equal(where, windows)
    assert (windows[4] if ten_crop else windows).tolist() == [14, 14, 0]
