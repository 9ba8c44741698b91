"""ImageNet stored as the paper stored it (section 2): every image down-sampled once to shorter
side 256 and its central 256x256 square, re-encoded as JPEG, in array_record shards that TFDS
opens as `imagenet2012_paper256` (random access). Prepared straight from the two ILSVRC2012
tars on every core, with the training set's mean image and RGB covariance (for the paper's
mean subtraction and PCA lighting) computed in the same pass.

A run that stops half-way (Ctrl-C, SIGTERM, or killed) keeps its finished shards and resumes
with the rest; its worker processes stop with it. The dataset's metadata, which is what makes
TFDS (and this project) see it, is written last. An image that does not decode is left out,
counted and listed in undecodable.json beside the shards.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import errno
import io
import json
import math
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_jax.errors import UsageError

# 1.1.0: resized with the antialiased bilinear filter of TFDS's general path (1.0.0: bicubic).
NAME, VERSION = "imagenet2012_paper256", "1.1.0"
SIZE, QUALITY = 256, 95  # JPEG quality 95: 256x256 photographs of ~30 KB
VAL_SHARD = 1000  # validation images per shard
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
# array_record's writer options: a record per chunk, for random access; uncompressed, as JPEGs
# do not compress and a read then skips the decompressor (docs/imagenet.md).
SHARD_OPTIONS = "group_size:1,uncompressed"


def to_paper256(data: bytes) -> np.ndarray:
    """Any image file (CMYK or greyscale JPEG, PNG under a .JPEG name, ...) -> the paper's
    256x256 RGB uint8: the central square of the shorter side, resized to 256 with an
    antialiased bilinear (triangle) filter, the one TFDS imagenet2012's general path uses
    (transforms.resize_square). Only the square is resampled, not the discarded sides."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        box = (left, top, left + side, top + side)
        resized = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
        return np.asarray(resized)


def encode(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def tfds_labels() -> tuple[list[str], list[str]]:
    """TFDS's imagenet2012 synsets in label order, and its validation labels (one synset per
    validation image, in the order of the sorted file names)."""
    import tensorflow_datasets as tfds

    root = tfds.core.tfds_path("datasets/imagenet2012")
    read = lambda name: (root / name).read_text().strip().splitlines()
    return read("labels.txt"), read("validation_labels.txt")


# ------------------------------------------------------------------------------- the shards


@dataclasses.dataclass(frozen=True)
class Job:
    """One shard: `members` are (name, offset, size) of image files or (train) of one class's
    inner tar, all inside `tar`; `labels` their labels (train: the class's, for every image)."""

    split: str
    index: int
    count: int  # shards in the split
    tar: str
    members: tuple[tuple[str, int, int], ...]
    labels: tuple[int, ...]


def shard_path(directory: Path, split: str, index: int, count: int) -> Path:
    return directory / f"{NAME}-{split}.array_record-{index:05d}-of-{count:05d}"


def _stats_path(shard: Path, suffix: str = ".npz") -> Path:
    """A shard's pixel sums (train) or list of undecodable images, kept apart from the files
    TFDS reads."""
    (shard.parent / "shard_stats").mkdir(exist_ok=True)
    return shard.parent / "shard_stats" / f"{shard.name}{suffix}"


def _images(job: Job) -> Iterator[tuple[str, bytes, int]]:
    with open(job.tar, "rb") as f:
        for (name, offset, size), label in zip(job.members, job.labels, strict=True):
            f.seek(offset)
            data = f.read(size)
            if job.split == "validation":
                yield name, data, label
                continue
            with tarfile.open(fileobj=io.BytesIO(data)) as inner:  # one class's images
                for m in inner:
                    if m.isfile():
                        yield m.name, inner.extractfile(m).read(), label


def write_shard(job: Job, directory: str) -> tuple[int, list[str]]:
    """Convert one shard's images and write the shard (and beside it, for train, its pixel
    statistics, and the images that did not decode) under a temporary name, renamed when
    complete. Returns its image count and the names of the images left out."""
    from array_record.python.array_record_module import ArrayRecordWriter

    final = shard_path(Path(directory), job.split, job.index, job.count)
    tmp = final.with_name(final.name + ".incomplete")
    features = _features()
    total, outer = np.zeros((SIZE, SIZE, 3), np.uint32), np.zeros((3, 3))
    writer = ArrayRecordWriter(str(tmp), SHARD_OPTIONS)
    n, bad = 0, []
    for name, data, label in _images(job):
        try:
            image = to_paper256(data)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # Pillow's errors
            bad.append(f"{job.split}/{name}: {type(e).__name__}: {e}")
            continue
        if job.split == "train":  # exact sums: integers, and float32 products of 0-255
            total += image
            pixels = image.reshape(-1, 3).astype(np.float32)
            outer += pixels.T @ pixels
        writer.write(features.serialize_example({"image": encode(image), "label": label}))
        n += 1
    writer.close()
    if job.split == "train":
        np.savez(_stats_path(final), total=total, outer=outer / 255.0**2, count=n)
    _stats_path(final, ".undecodable.json").write_text(json.dumps(bad))
    os.replace(tmp, final)
    return n, bad


def _features():
    import tensorflow_datasets as tfds

    names, _ = tfds_labels()
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=names),
        }
    )


def plan(manual_dir: Path) -> list[Job]:
    """Every shard of both splits, from the tars' headers (no image is read here)."""
    synsets, val_labels = tfds_labels()
    index = {s: i for i, s in enumerate(synsets)}
    jobs = []
    train = str(manual_dir / TRAIN_TAR)
    classes = [m for m in _members(train) if m.name.endswith(".tar")]
    if not classes:
        raise UsageError(
            f"{train} holds no tar per class (n01440764.tar, ...): it is not the "
            f"{TRAIN_TAR} image-net.org serves, whose members are one tar of JPEGs per class. "
            "Put the downloaded file there, unextracted."
        )
    unknown = [m.name for m in classes if m.name[:-4] not in index]
    if unknown:
        raise UsageError(f"{train} holds tars of unknown classes: {unknown[:3]}.")
    for i, m in enumerate(classes):
        member = ((m.name, m.offset_data, m.size),)
        jobs.append(Job("train", i, len(classes), train, member, (index[m.name[:-4]],)))
    val = str(manual_dir / VAL_TAR)
    files = sorted(_members(val), key=lambda m: m.name)
    if not files:
        raise UsageError(f"{val} holds no files: put the downloaded {VAL_TAR} there.")
    # TFDS's list gives the label of each validation file in sorted-name order.
    labels = [index[s] for s in val_labels[: len(files)]]
    count = math.ceil(len(files) / VAL_SHARD)
    for i in range(count):
        chunk = files[i * VAL_SHARD : (i + 1) * VAL_SHARD]
        members = tuple((m.name, m.offset_data, m.size) for m in chunk)
        jobs.append(
            Job("validation", i, count, val, members, tuple(labels[i * VAL_SHARD :][: len(chunk)]))
        )
    return jobs


def _members(path: str) -> list[tarfile.TarInfo]:
    """The files of the tar at `path`, read from its headers; one line if it is not a whole
    tar (empty, another kind of file, cut short)."""
    try:
        with tarfile.open(path) as tar:
            return [m for m in tar if m.isfile()]
    except (tarfile.TarError, EOFError, OSError) as e:
        why = (str(e).splitlines() or [""])[0].rstrip(":")
        raise UsageError(
            f"{path} is not a whole tar ({type(e).__name__}: {why}): an empty file, another kind "
            "of file, or a download cut short. Download it again from https://image-net.org."
        ) from None


def prepare(data_dir: str, manual_dir: str, processes: int | None = None) -> Path:
    """Prepare (or finish preparing) the paper-256 dataset under data_dir; returns its path."""
    import tensorflow_datasets as tfds

    directory = Path(data_dir).expanduser() / NAME / VERSION
    if (directory / "dataset_info.json").exists():
        print(f"{directory} is already prepared; nothing to do.")
        return directory
    jobs = plan(Path(manual_dir).expanduser())  # the tars checked before anything is written
    made = _make(directory)
    try:
        convert(jobs, directory, processes or len(os.sched_getaffinity(0)))
        _finish(directory, jobs, tfds)
    except OSError as e:
        raise UsageError(_unwritable(directory, e)) from None
    finally:  # a preparation that wrote nothing leaves no folder behind
        for d in made:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return directory


def _make(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; returns those it created, deepest first."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(_unwritable(directory, e)) from None
    return missing


def _unwritable(directory: Path, e: OSError) -> str:
    why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
    return (
        f"{directory} could not be written ({why}). Choose a --data_dir on a writable disk "
        "with about 40 GB free; shards already written are kept, and the same command "
        "finishes the rest."
    )


class Stopped(Exception):
    """SIGTERM or Ctrl-C stopped the conversion; the finished shards are kept. args: the
    signal's name, then (once the workers are stopped) what to tell the user."""

    @property
    def exit_status(self) -> int:
        return 128 + signal.Signals[self.args[0]].value


def convert(jobs: list[Job], directory: Path, processes: int) -> None:
    """Write the shards of `jobs` that are not written yet, on `processes` worker processes
    that exit with this one (however it ends). SIGTERM and Ctrl-C stop them and raise Stopped,
    which says how many shards are kept and how to resume; a worker that dies (the kernel's
    out-of-memory killer, a crash in a codec) stops the run with a UsageError that says the
    same, where a multiprocessing.Pool would replace the worker and wait for its shard forever."""
    todo = [j for j in jobs if not shard_path(directory, j.split, j.index, j.count).exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} shards already written; {processes} processes")
    start, images, done, skipped = time.time(), 0, len(jobs) - len(todo), 0

    def kept() -> str:
        finished = sum(shard_path(directory, j.split, j.index, j.count).exists() for j in jobs)
        return f"{finished} of {len(jobs)} shards are written and kept in {directory}"

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    # spawn, not fork: the parent has TensorFlow's threads running.
    context = multiprocessing.get_context("spawn")
    quit_event = context.Event()
    pool = concurrent.futures.ProcessPoolExecutor(
        processes, context, initializer=_exit_with_parent, initargs=(os.getpid(), quit_event)
    )
    try:
        futures = [pool.submit(write_shard, j, str(directory)) for j in todo]
        for future in concurrent.futures.as_completed(futures):
            n, bad = future.result()
            images, done, skipped = images + n, done + 1, skipped + len(bad)
            for line in bad:
                print(f"left out, does not decode: {line}", flush=True)
            rate = images / (time.time() - start)
            left = (len(jobs) - done) * (images / max(done - (len(jobs) - len(todo)), 1))
            eta = datetime.timedelta(seconds=round(left / max(rate, 1e-9)))
            print(
                f"{done}/{len(jobs)} shards, {images:,} images, {rate:,.0f} images/s "
                f"({rate / processes:,.0f} per process), ETA {eta}"
                + (f", {skipped} left out" if skipped else ""),
                flush=True,
            )
    except concurrent.futures.process.BrokenProcessPool:
        raise UsageError(
            f"a worker process died while writing shards (killed by the system, perhaps for "
            f"memory: see `dmesg`); {kept()}. Run the same command to write the rest, with "
            f"fewer --processes if memory ran out."
        ) from None
    except (tarfile.TarError, EOFError) as e:
        raise UsageError(
            f"a tar could not be read ({type(e).__name__}: {e}), perhaps a download cut "
            f"short; {kept()}. Download it again and run the same command to write the rest."
        ) from None
    except (KeyboardInterrupt, Stopped) as e:
        name = e.args[0] if isinstance(e, Stopped) else "SIGINT"
        message = f"stopped ({name}): {kept()}. Run the same command to write the rest."
        raise Stopped(name, message) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        quit_event.set()  # a shard cut short stays .incomplete and is written again
        pool.shutdown(wait=True, cancel_futures=True)


def _exit_with_parent(parent: int, quit_event: multiprocessing.synchronize.Event) -> None:
    """In each worker: exit as soon as the process that started it is gone (killed, even
    with SIGKILL), rather than write shards for nobody beside a new run's, or as soon as it
    sets `quit_event` (stopped), even in the middle of a shard."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle

    def watch() -> None:
        while os.getppid() == parent and not quit_event.wait(0.5):
            pass
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _finish(directory: Path, jobs: list[Job], tfds) -> None:
    """Statistics, then TFDS's metadata (whose presence marks the dataset finished)."""
    from array_record.python.array_record_module import ArrayRecordReader

    lengths: dict[str, list[int]] = {"train": [], "validation": []}
    undecodable = []
    for j in jobs:
        shard = shard_path(directory, j.split, j.index, j.count)
        reader = ArrayRecordReader(str(shard))
        lengths[j.split].append(reader.num_records())
        reader.close()
        listed = _stats_path(shard, ".undecodable.json")
        undecodable += json.loads(listed.read_text()) if listed.exists() else []
    (directory / "undecodable.json").write_text(json.dumps(undecodable, indent=1))
    if undecodable:
        print(
            f"{len(undecodable)} images did not decode and are left out (listed in "
            f"{directory / 'undecodable.json'}): {undecodable[:3]}"
        )
    train = [shard_path(directory, "train", j.index, j.count) for j in jobs if j.split == "train"]
    parts = [np.load(_stats_path(p)) for p in train]
    count = sum(int(p["count"]) for p in parts)
    mean_image = sum(p["total"].astype(np.float64) for p in parts) / count
    mean = mean_image.reshape(-1, 3).mean(0) / 255.0
    cov = sum(p["outer"] for p in parts) / (count * SIZE * SIZE) - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    np.save(directory / "mean_image.npy", mean_image.astype(np.float32))
    stats = {
        "mean": (mean * 255).tolist(),
        "eigval": np.clip(eigval[order], 0, None).tolist(),
        "eigvec": eigvec[:, order].tolist(),
        "images": count,
    }
    (directory / "rgb_stats.json").write_text(json.dumps(stats, indent=1))
    splits = [tfds.core.SplitInfo(name=s, shard_lengths=n, num_bytes=0) for s, n in lengths.items()]
    tfds.folder_dataset.write_metadata(
        data_dir=directory,
        features=_features(),
        split_infos=splits,
        check_data=False,
        description="ImageNet 2012 at 256x256 (shorter side 256, central square), JPEG q95.",
    )
