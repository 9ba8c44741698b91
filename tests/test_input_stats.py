"""The input statistics: the training split's mean and RGB covariance as NumPy computes them,
cached in the workdir under the data's key."""

import numpy as np

from alexnet_jax import input_stats, sources, splits


def test_stats_of_the_training_split_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3)).astype(np.uint8)
    split = splits.ArraySplit(images, np.zeros(20, np.int64), shuffle=True)
    stats = input_stats.compute_stats(split, 8, 100)
    pixels = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats.mean, pixels.mean(0), rtol=1e-6)
    cov = np.cov((pixels / 255).T, bias=True)
    v, lam = np.asarray(stats.eigvec), np.asarray(stats.eigval)
    np.testing.assert_allclose(v @ np.diag(lam) @ v.T, cov, atol=1e-9)
    assert lam[0] >= lam[1] >= lam[2]
    np.testing.assert_allclose(stats.std(), pixels.std(0), rtol=1e-6)


def test_stats_are_cached_in_the_workdir(tmp_path):
    source = sources.digits_source()
    a = input_stats.get_stats(source, 72, 10_000, str(tmp_path))
    assert (tmp_path / "input_stats.json").exists()
    assert input_stats.get_stats(source, 72, 10_000, str(tmp_path)) == a
    assert input_stats.get_stats(source, 80, 10_000, str(tmp_path)) != a  # another key: recomputed
