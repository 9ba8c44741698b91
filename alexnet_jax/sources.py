"""Data sources: TFDS imagenet2012 (as TFDS or as the paper stored it), a folder of class
sub-folders, and the embedded digits. A source has a train and an eval split (splits.py), its
class names and, where stored with the data, its statistics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from alexnet_jax import paths, staging
from alexnet_jax.errors import UsageError
from alexnet_jax.records import RecordSplit, SequentialSplit
from alexnet_jax.splits import ArraySplit, FolderSplit, Split

DATASETS = ("digits", "imagenet2012", "imagenet2012_paper256", "imagefolder")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


@dataclasses.dataclass
class Source:
    name: str
    fingerprint: str  # identifies the data, for the statistics cache
    class_names: list[str]
    train: Split
    eval: Split
    stats: dict | None = None  # input statistics stored with the data (transforms.Stats)
    stored_size: int | None = None  # every image stored as a square of this side
    mean_image: np.ndarray | None = None  # the training set's, stored with the data

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def digits_source() -> Source:
    """scikit-learn's 1,797 real 8x8 handwritten digits (bundled, no download), grey to RGB.

    The split is fixed (seeded permutation, 360 held-out images) whatever the run's seed.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    order = np.random.default_rng(20121203).permutation(len(images))
    test, train = order[:360], order[360:]
    names = [str(d) for d in range(10)]
    return Source(
        "digits",
        "sklearn-digits-1797",
        names,
        ArraySplit(images[train], data.target[train], shuffle=True),
        ArraySplit(images[test], data.target[test], shuffle=False),
    )


def imagefolder_source(cfg: ml_collections.ConfigDict) -> Source:
    """`input.data_dir`/{train_split,eval_split}/<class name>/<image files>."""
    if not cfg.data_dir:
        raise UsageError(
            "input.dataset='imagefolder' needs --config.input.data_dir=DIR, with DIR/"
            f"{cfg.train_split}/<class>/*.jpg and DIR/{cfg.eval_split}/<class>/*.jpg."
        )
    if paths.is_url(paths.data_path(cfg.data_dir, "input.data_dir")):
        raise UsageError(
            f"input.data_dir={cfg.data_dir!r}: an image folder is read from a local directory, "
            "not a bucket. Copy it to this host, or prepare ImageNet as "
            "imagenet2012_paper256, which is staged from a bucket (docs/imagenet.md)."
        )
    root = Path(paths.data_path(cfg.data_dir, "input.data_dir"))
    train_dir, eval_dir = root / cfg.train_split, root / cfg.eval_split
    for d in (train_dir, eval_dir):
        if not d.is_dir():
            raise UsageError(
                f"Image folder {d} does not exist. input.dataset='imagefolder' reads "
                f"{root}/{cfg.train_split}/<class>/ and {root}/{cfg.eval_split}/<class>/."
            )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    unknown = sorted({p.name for p in eval_dir.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise UsageError(f"{eval_dir} has classes that {train_dir} lacks: {unknown[:5]}.")
    return Source(
        "imagefolder",
        f"imagefolder:{root.resolve()}",
        classes,
        FolderSplit(train_dir, classes, shuffle=True),
        FolderSplit(eval_dir, classes, shuffle=False),
    )


def _imagenet_not_prepared(cfg: ml_collections.ConfigDict, data_dir: str) -> UsageError:
    manual = cfg.manual_dir or os.path.join(data_dir, "downloads", "manual")
    return UsageError(
        f"ImageNet (TFDS imagenet2012) is not prepared in {data_dir}. Download "
        f"{' and '.join(IMAGENET_TARS)} from https://image-net.org (a login is needed), put "
        f"both in {manual}, then run once:\n"
        f"  python -m alexnet_jax.prepare_imagenet --data_dir={data_dir} --manual_dir={manual}\n"
        f"and pass --config.input.data_dir={data_dir} to launch.py."
    )


def imagenet_source(cfg: ml_collections.ConfigDict) -> Source:
    """TFDS imagenet2012: random access when prepared as array_record, else TFRecord reading."""
    data_dir = paths.data_path(cfg.data_dir or "~/tensorflow_datasets", "input.data_dir")
    builder = bucket_read(data_dir, lambda: tfds.builder("imagenet2012", data_dir=data_dir))

    def split(name: str, shuffle: bool) -> Split:
        try:
            return RecordSplit(builder, name, shuffle)
        except NotImplementedError:  # TFRecord files, or nothing prepared
            pass
        try:
            seq = SequentialSplit(builder, cfg, name, shuffle)
        except AssertionError as e:  # TFDS: "could not find data in ..."
            raise _imagenet_not_prepared(cfg, data_dir) from e
        logging.warning(
            "imagenet2012/%s is stored as TFRecord: every process reads every record, and a "
            "resumed run re-reads its epoch. `python -m alexnet_jax.prepare_imagenet` prepares "
            "array_record files instead (random access).",
            name,
        )
        return seq

    return Source(
        "imagenet2012",
        f"imagenet2012:{data_dir}",
        imagenet_class_names(),
        split(cfg.train_split, shuffle=True),
        split(cfg.eval_split, shuffle=False),
    )


def paper256_source(cfg: ml_collections.ConfigDict) -> Source:
    """ImageNet as the paper stored it (paper256.py), with its training set's statistics."""
    from alexnet_jax import paper256

    data_dir = paths.data_path(cfg.data_dir or "~/tensorflow_datasets", "input.data_dir")

    def not_prepared() -> UsageError:
        return UsageError(
            f"{paper256.NAME} is not prepared in {data_dir}. Put {' and '.join(IMAGENET_TARS)} "
            f"in a directory TARS and run once:\n  python -m alexnet_jax.prepare_imagenet "
            f"--form=paper256 --data_dir={data_dir} --manual_dir=TARS"
            + ("\n(then copy what it writes to the bucket)" if paths.is_url(data_dir) else "")
        )

    relative = f"{paper256.NAME}/{paper256.VERSION}"
    stage_dir = paths.data_path(cfg.stage_dir, "input.stage_dir")
    directory = bucket_read(
        data_dir, lambda: staging.local_dataset(data_dir, relative, stage_dir, not_prepared)
    )
    builder = tfds.builder_from_directory(str(directory))
    # Without fancy (interpolated) chroma upsampling, decoding only a crop window gives the
    # same pixels as decoding the whole image and cropping (input_pipeline's crop-only path).
    split = lambda name, shuffle: RecordSplit(builder, name, shuffle, fancy_upscaling=False)
    return Source(
        paper256.NAME,
        f"{paper256.NAME}:{directory}",
        imagenet_class_names(),
        split(cfg.train_split, shuffle=True),
        split(cfg.eval_split, shuffle=False),
        stats=json.loads((directory / "rgb_stats.json").read_text()),
        stored_size=paper256.SIZE,
        mean_image=np.load(directory / "mean_image.npy"),
    )


def bucket_read(data_dir: str, read: Callable[[], Any]) -> Any:
    """read(), with a failure to reach a bucket (no network, a missing bucket, no
    credentials) as one line naming it; local paths' errors pass as they are."""
    try:
        return read()
    except UsageError:
        raise
    except Exception as e:
        if not paths.is_url(data_dir):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(
            f"input.data_dir={data_dir} could not be read ({type(e).__name__}: {first}). Check "
            "the bucket's name, this host's network and its credentials (gcloud auth "
            "application-default login)."
        ) from None


def imagenet_class_names() -> list[str]:
    path = Path(__file__).with_name("imagenet2012_classes.txt")
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def create_source(cfg: ml_collections.ConfigDict, process_count: int = 1) -> Source:
    """The source named by `cfg.dataset` (the `input` part of the config), for a run of
    `process_count` processes."""
    if cfg.dataset == "digits":
        source = digits_source()
    elif cfg.dataset == "imagenet2012":
        source = imagenet_source(cfg)
    elif cfg.dataset == "imagenet2012_paper256":
        source = paper256_source(cfg)
    elif cfg.dataset == "imagefolder":
        source = imagefolder_source(cfg)
    else:
        raise UsageError(f"input.dataset={cfg.dataset!r} is unknown; use one of {DATASETS}.")
    if process_count > 1 and not (source.train.random_access and source.eval.random_access):
        raise UsageError(
            f"{cfg.dataset} is stored as TFRecord, which every one of the {process_count} "
            "processes would read whole. Prepare it as array_record (random access) with "
            "`python -m alexnet_jax.prepare_imagenet`, or train with one process."
        )
    return source
