"""The input statistics of a dataset: the training set's mean image, channel mean and RGB
covariance eigen-decomposition (paper sections 2 and 4.1), computed once and cached in the
workdir, or taken from where the data keeps them.
"""

from __future__ import annotations

import io
import json

import numpy as np
import tensorflow as tf
from etils import epath

from alexnet_jax import paths
from alexnet_jax.input_pipeline import iterate, on_threads, parallelism
from alexnet_jax.sources import Source
from alexnet_jax.splits import Split
from alexnet_jax.transforms import IMAGENET_STATS, Stats, resize_square


def compute_stats(split: Split, resize_size: int, max_images: int) -> Stats:
    """Mean image, mean and RGB-covariance eigen-decomposition over (up to max_images of) a
    training split, each image at resize_size x resize_size."""

    def moments(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        square = tf.cast(resize_square(split.decode(raw)[0], resize_size), tf.float64)
        pixels = tf.reshape(square, [-1, 3]) / 255.0
        return square, tf.matmul(pixels, pixels, transpose_a=True)

    ds = split.epoch(0, 0, 0).take(max_images).map(moments, parallelism(None))
    ds = on_threads(ds, None)
    total, outer, count = np.zeros((resize_size, resize_size, 3)), np.zeros((3, 3)), 0
    for s, o in iterate(ds, split):  # an undecodable image is named, not a TF traceback
        total, outer, count = total + s, outer + o, count + 1
    mean_image = total / count
    mean = mean_image.reshape(-1, 3).mean(0) / 255.0
    cov = outer / (count * resize_size**2) - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    return Stats(
        tuple(float(v) for v in mean * 255.0),
        tuple(float(v) for v in eigval),
        tuple(tuple(float(v) for v in row) for row in eigvec),
        mean_image.astype(np.float32),
    )


def get_stats(
    source: Source,
    resize_size: int,
    max_images: int,
    workdir: epath.PathLike | None,
    write: bool = True,
) -> Stats:
    """ImageNet's built-in statistics, else those stored with the data, else the training
    split's, cached in workdir (input_stats.json, input_mean_image.npy)."""
    if source.name == "imagenet2012":
        return IMAGENET_STATS
    if source.stats is not None:  # computed when the data was prepared
        return Stats.from_dict(source.stats, source.mean_image)
    key = f"{source.fingerprint}|resize={resize_size}|max={max_images}"
    path = epath.Path(workdir) / "input_stats.json" if workdir else None
    image_path = path.with_name("input_mean_image.npy") if path is not None else None
    if path is not None and path.exists() and image_path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            with image_path.open("rb") as f:
                return Stats.from_dict(cached, np.load(f))
    stats = compute_stats(source.train, resize_size, max_images)
    if path is not None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        image = io.BytesIO()
        np.save(image, stats.mean_image)
        paths.write_whole(image_path, image.getvalue())
        paths.write_whole(path, json.dumps({"key": key, **stats.to_dict()}))
    return stats
