"""input.skip_corrupt: the images of a dataset that do not decode, found by one decoding pass
before training and cached in the workdir, and the dataset without them.
"""

from __future__ import annotations

import dataclasses
import json

import tensorflow as tf
from absl import logging
from etils import epath

from alexnet_jax import paths
from alexnet_jax.errors import UsageError
from alexnet_jax.input_pipeline import on_threads, parallelism
from alexnet_jax.sources import Source
from alexnet_jax.splits import Split


def undecodable(split: Split) -> list[int]:
    """The keys of every example of a random-access `split` that fails to decode: a parallel
    decoding pass that drops the failures, then the difference."""
    decodes = lambda key: (key, tf.shape(split.decode(key)[0]))
    ds = on_threads(split.epoch(0, 0, 0).map(decodes, num_parallel_calls=parallelism(None)), None)
    good = {int(k) for k, _ in ds.ignore_errors().as_numpy_iterator()}
    return sorted(set(range(split.size)) - good)


def skip_undecodable(source: Source, workdir: epath.PathLike | None, write: bool = True) -> Source:
    """`source` without the images that do not decode (input.skip_corrupt), found by one
    decoding pass over both splits before training, cached in workdir/undecodable.json."""
    if not (source.train.random_access and source.eval.random_access):
        raise UsageError(
            f"input.skip_corrupt needs random access to the data; {source.name} is stored as "
            "TFRecord. Prepare it as array_record (python -m alexnet_jax.prepare_imagenet)."
        )
    path = epath.Path(workdir) / "undecodable.json" if workdir else None
    cached = json.loads(path.read_text()) if path is not None and path.exists() else {}
    # Keyed by the files' names and sizes: indices into a folder that changed would name
    # other images.
    key = [source.fingerprint] + [s.contents() or "" for s in (source.train, source.eval)]
    if cached.get("key") != key:
        logging.info("input.skip_corrupt: decoding every image once to find the bad ones")
        cached = {"key": key}
        for name, split in (("train", source.train), ("eval", source.eval)):
            bad = undecodable(split)
            cached[name] = bad
            cached[f"{name}_names"] = [split.describe(0, tf.constant(k, tf.int64)) for k in bad]
        if path is not None and write:
            paths.write_whole(path, json.dumps(cached, indent=1))
    for name in ("train", "eval"):
        if cached[name]:
            logging.warning(
                "input.skip_corrupt: leaving out %d undecodable %s images: %s",
                len(cached[name]),
                name,
                ", ".join(cached[f"{name}_names"][:10]),
            )
    return dataclasses.replace(
        source,
        train=source.train.without(cached["train"]),
        eval=source.eval.without(cached["eval"]),
    )
