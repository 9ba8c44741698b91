"""Images/s per core of the input paths, beside what the train step consumes on this machine.

    .venv/bin/python benchmarks/input_pipeline.py [--images=384] [--step_batch=32] [--rounds=3]

Makes ImageNet-like JPEGs (crops and scales of the two photographs scikit-learn ships, about
500x375 like ImageNet's; not random noise, which decodes unlike photographs), writes them as
ILSVRC2012 tars, and times on one core each (one process, one tf.data thread), in batches of
configs/alexnet.py's 128:

- preparation of the paper-256 form (paper256.py: decode, resize, re-encode);
- the train path on the raw JPEGs (decode everything, resize, crop, draw the mirror and the
  lighting; as configs/alexnet.py trains, the device mirrors and normalises);
- the train path on paper-256 data (decode only the crop window, the same draws), and the
  decoding of those windows alone;
- the eval path on paper-256 data, centre crop and ten patches;
- reading paper-256 records, as records.py does and through TFDS's Python deserialisation;

then, per process, the paper-256 train path and the reading with two input threads (against one:
how far a process's input scales with its cores), the paper-256 train path with DALI decoding on
the CPU (input.loader=dali, where DALI is installed) with one and two threads, the reading with
two threads in a process set up as on a GPU or TPU host, with glibc's malloc as it comes and as
backend.prepare_backend leaves it (a process each, alternating; with the page faults per
record), the paper model's train step (all cores) at the given batch, in images/s, and the
training loop's own time per step: launch.py's loop on a model too small to cost anything
(1/64 width, 67x67 inputs, the in-memory digits, the global batch of configs/alexnet.py), the
host's share of every step at accelerator rates.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ importable
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Only when run as a script: benchmarks/accelerator.py imports this module's functions."""
    flags.DEFINE_integer("images", 384, "Training images to make (and validation: 1/4).")
    flags.DEFINE_integer("step_batch", 32, "Batch of the timed train step (0: skip).")
    flags.DEFINE_integer("rounds", 3, "Interleaved rounds of the input paths' timings.")
    flags.DEFINE_integer("loop_steps", 400, "Steps of the tiny loop run (0: skip).")


def photographs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs (quality 90) of random crops, scales and mirrors of scikit-learn's photographs,
    landscape or portrait at about 500x375."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    sources = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    out = []
    for i in range(n):
        photo = sources[i % 2]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(photo[top : top + ch, left : left + cw])
        size = (500, 375) if rng.random() < 0.7 else (375, 500)
        im = im.resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(root: Path, train: list[bytes], val: list[bytes], synsets: list[str]) -> None:
    """ILSVRC2012_img_train.tar (an inner tar per synset) and ILSVRC2012_img_val.tar."""
    from alexnet_jax import paper256

    per_class = np.array_split(np.arange(len(train)), len(synsets))
    with tarfile.open(root / paper256.TRAIN_TAR, "w") as outer:
        for synset, idx in zip(synsets, per_class, strict=True):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i in idx:
                    _add(t, f"{synset}_{i}.JPEG", train[i])
            _add(outer, f"{synset}.tar", inner.getvalue())
    with tarfile.open(root / paper256.VAL_TAR, "w") as tar:
        for i, data in enumerate(val):
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", data)


def synthetic_imagenet(
    root: Path, n: int, n_val: int = 16, prepare: bool = True, processes: int | None = None
) -> tuple[list[bytes], list[bytes]]:
    """ILSVRC2012's two tars in root/tars, of `n` train and `n_val` validation photographs in
    the first 4 synsets, and (`prepare`) their paper-256 preparation in root/data, on
    `processes` workers; returns the train and validation photographs."""
    from alexnet_jax import paper256

    train, val = photographs(n, 0), photographs(n_val, 1)
    (root / "tars").mkdir(parents=True)
    write_tars(root / "tars", train, val, paper256.tfds_labels()[0][:4])
    if prepare:
        paper256.prepare(str(root / "data"), str(root / "tars"), processes=processes)
    return train, val


def _rate(ds, split) -> float:
    """Images/s of iterating a dataset, after one warm-up batch."""
    from alexnet_jax import input_pipeline as ip

    return iterator_rate(ip.iterate(ds, split))


def iterator_rate(it) -> float:
    """Images/s of a stream of batches, after one warm-up batch."""
    next(it)
    start, count = time.perf_counter(), 0
    for batch in it:
        count += len(batch["labels"] if isinstance(batch, dict) else batch.labels)
    return count / (time.perf_counter() - start)


def decode_rate(source, epochs: int, batch: int) -> float:
    """Images/s of decoding a 227x227 window of each stored JPEG, held in memory, a batch per
    call as the train path decodes: the ceiling of the paper-256 train path, which also
    reads, draws and batches."""
    import tensorflow as tf

    from alexnet_jax import input_pipeline as ip

    keys = tf.range(source.train.size, dtype=tf.int64)
    jpegs, labels = source.train.fetch(keys)
    ds = tf.data.Dataset.from_tensor_slices((jpegs, labels)).repeat(epochs).batch(batch)
    spec = tf.TensorSpec([227, 227, 3], tf.uint8)
    crop = lambda j: tf.io.decode_and_crop_jpeg(j, [14, 14, 227, 227], 3, fancy_upscaling=False)
    windows = lambda j, y: {"images": tf.map_fn(crop, j, fn_output_signature=spec), "labels": y}
    return _rate(ip.on_threads(ds.map(windows), 1), source.train)


def batched_read(instructions: list) -> Callable[[np.ndarray], np.ndarray]:
    """records.py's reader with array_record's batched read instead: a call per shard and
    batch (the alternative to records.py's read of a record per call, timed beside it)."""
    from alexnet_jax import records

    class _BatchedRows(records.ArrayRecordRows):
        def read(self, keys: np.ndarray) -> np.ndarray:
            shard = np.searchsorted(self._starts, keys, side="right") - 1
            readers = self._open(np.unique(shard))
            out = np.empty(len(keys), dtype=object)
            for s in np.unique(shard):
                at = np.flatnonzero(shard == s)
                out[at] = readers[s].read((keys[at] - self._starts[s] + self._skips[s]).tolist())
            return out

    return _BatchedRows(instructions).read


def records_rate(fetch, size: int, batch: int, epochs: int, threads: int = 1) -> float:
    """Records/s of `fetch` (keys -> images, labels) over `size` records in a shuffled order,
    a batch of keys per call on `threads` threads. The records' bytes stay in TensorFlow (the
    loop takes their lengths), as the train path's decoding takes them."""
    import tensorflow as tf

    from alexnet_jax import input_pipeline as ip

    order = tf.data.Dataset.range(size).shuffle(size, seed=0)
    keys = order.repeat(epochs).batch(batch)

    def lengths(k):
        images, labels = fetch(k)
        return {"bytes": tf.strings.length(images), "labels": labels}

    ds = keys.map(lengths, num_parallel_calls=threads).prefetch(threads)
    return iterator_rate(ip.on_threads(ds, threads).as_numpy_iterator())


def read_rates(directory: Path, batch: int, epochs: int) -> dict[str, Callable[[], float]]:
    """Records/s of reading paper-256's train split a batch of keys per call, in a shuffled
    order, three ways: as records.py reads (a record per read call, parsed by TensorFlow a
    batch at once), with array_record's batched read instead, and through TFDS's per-example
    deserialisation in Python."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from alexnet_jax import records

    builder = tfds.builder_from_directory(str(directory))
    split = records.RecordSplit(builder, "train", shuffle=False)
    batched = batched_read(records.array_record_files(builder, "train"))

    def batched_fetch(keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        out = tf.numpy_function(batched, [keys], tf.string, stateful=False)
        example = tf.io.parse_example(tf.ensure_shape(out, [None]), records.EXAMPLE_SPEC)
        return example["image"], tf.cast(example["label"], tf.int32)

    tfds_source = builder.as_data_source(
        split="train", decoders={"image": tfds.decode.SkipDecoding()}
    )

    def tfds_np(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        examples = tfds_source.__getitems__([int(k) for k in keys])
        images = np.array([e["image"] for e in examples], dtype=object)
        return images, np.array([e["label"] for e in examples], np.int32)

    tfds_fetch = lambda keys: tf.numpy_function(tfds_np, [keys], (tf.string, tf.int32))
    rate = lambda fetch, threads=1: records_rate(fetch, split.size, batch, epochs, threads)

    return {
        "reading, a record per read call (used)": lambda: rate(split.fetch),
        "reading, array_record's batched read": lambda: rate(batched_fetch),
        "reading, TFDS's deserialisation in Python": lambda: rate(tfds_fetch),
        PROCESS + "reading (used), 2 threads": lambda: rate(split.fetch, 2),
        PROCESS + "reading, batched read, 2 threads": lambda: rate(batched_fetch, 2),
    }


PROCESS = "process: "  # rows timed with more than one thread, reported per process
HOST_READ = PROCESS + "reading, 2 threads, GPU/TPU host, "
MALLOCS = {"system": "plain malloc", "kept": "memory kept"}  # glibc's as it comes; ours


def host_read(directory: Path, batch: int, epochs: int, malloc: str) -> tuple[float, float]:
    """Records/s of reading with two threads, and page faults per record, in a process of its
    own set up as launch.py sets up a GPU or TPU host (backend.prepare_backend: glibc's malloc
    keeps freed memory; `malloc` "kept"), or with glibc's malloc as it comes ("system"). malloc
    is set once per process, before any thread starts, hence the process."""
    code = (
        "import sys; from benchmarks.input_pipeline import _read_child; _read_child(*sys.argv[1:])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(directory), str(batch), str(epochs), malloc],
        env={**os.environ, "JAX_PLATFORMS": "cuda"},  # the host's settings; nothing starts JAX
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def _read_child(directory: str, batch: str, epochs: str, malloc: str) -> None:
    """host_read's process: prints records/s and page faults per record."""
    import resource

    from alexnet_jax import backend

    backend.prepare_backend(malloc=malloc == "kept")
    import tensorflow_datasets as tfds

    size = tfds.builder_from_directory(directory).info.splits["train"].num_examples
    rate = read_rates(Path(directory), int(batch), int(epochs))[
        PROCESS + "reading (used), 2 threads"
    ]
    rate()  # warm-up: the readers opened, the pipeline traced, the heap grown
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    records_per_s = rate()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(records_per_s, faults / (size * int(epochs)))


DALI = "train path, paper-256, DALI on the CPU, "


def main(argv: list[str]) -> None:
    del argv
    from alexnet_jax import backend

    # The XLA flags launch.py runs with, before any backend starts (the step rate).
    backend.prepare_backend()

    from alexnet_jax import config_checks, loaders, paper256, sources, transforms
    from alexnet_jax import input_pipeline as ip
    from configs import alexnet

    synsets = paper256.tfds_labels()[0][:4]
    n = FLAGS.images
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, val = synthetic_imagenet(root, n, max(n // 4, 16), prepare=False)
        # Preparation's per-image work, timed in this process (a worker's start-up excluded);
        # then prepare() finds those shards written and adds the rest and the metadata.
        out = root / "data" / paper256.NAME / paper256.VERSION
        out.mkdir(parents=True)
        jobs = [j for j in paper256.plan(root / "tars") if j.split == "train"]
        paper256.write_shard(jobs[0], str(out))  # warm-up: imports, the first shard
        start = time.perf_counter()
        done = sum(paper256.write_shard(j, str(out))[0] for j in jobs[1:])
        prep = done / (time.perf_counter() - start)
        rows.append(("preparation (paper-256, Pillow)", prep))
        paper256.prepare(str(root / "data"), str(root / "tars"), processes=1)
        stored_bytes = sum(f.stat().st_size for f in out.glob("*-train.array_record-*")) / n
        source_bytes = sum(len(x) for x in train) / n

        # The same photographs as an image folder: the general path, from the raw JPEGs.
        for k, synset in enumerate(synsets):
            for split, images in (("train", train), ("validation", val)):
                d = root / "folder" / split / synset
                d.mkdir(parents=True)
                for i in range(k, len(images), len(synsets)):
                    (d / f"{i}.jpg").write_bytes(images[i])
        cfg = alexnet.get_config().input
        cfg.dataset, cfg.data_dir = "imagefolder", str(root / "folder")
        folder = sources.create_source(cfg)
        cfg.dataset, cfg.data_dir = "imagenet2012_paper256", str(root / "data")
        stored = sources.create_source(cfg)
        # As configs/alexnet.py runs: uint8 crops out, normalised on the device; the mean
        # image where the data has one (paper-256), else the channel mean.
        stats = transforms.Stats.from_dict(stored.stats, stored.mean_image)
        p = transforms.Preprocess(stats, 227, 256, True, 0.1, mean="image", on_device=True)
        # In batches of configs/alexnet.py's 128 (what a host with one accelerator prepares
        # per step), fewer for a small --images; each path reads its data `epochs` times.
        batch, epochs = min(alexnet.get_config().batch_size, n // 3), 8

        def train_rate(source, p, threads: int = 1):
            steps = epochs * source.train.size // batch
            stream = dict(seed=0, batch_size=batch, start_step=0, num_steps=steps, threads=threads)
            return iterator_rate(loaders.train_batches(source, p, **stream))

        raw = dataclasses.replace(p, mean="channel")
        host = dataclasses.replace(p, on_device=False)

        def eval_rate(ten: bool) -> float:
            q = dataclasses.replace(p, ten_crop=ten)
            # Whole batches: the padding of a last, partial one would be timed as no images.
            whole = min(batch, stored.eval.size)
            ds = ip.eval_dataset(stored, q, batch_size=whole, threads=1).repeat(epochs)
            return _rate(ds, stored.eval)

        paths = {
            "train path, raw JPEGs (decode all, resize)": lambda: train_rate(folder, raw),
            "train path, paper-256 (decode crop window)": lambda: train_rate(stored, p),
            "  the same, normalised on the host (float32)": lambda: train_rate(stored, host),
            "  its decoding alone (the window, from memory)": lambda: decode_rate(
                stored, epochs, batch
            ),
            "eval path, paper-256, centre crop": lambda: eval_rate(False),
            "eval path, paper-256, ten patches": lambda: eval_rate(True),
            **read_rates(out, batch, 8 * epochs),  # reads are fast: more of them
            PROCESS + "train path, paper-256, 1 thread": lambda: train_rate(stored, p, 1),
            PROCESS + "train path, paper-256, 2 threads": lambda: train_rate(stored, p, 2),
        }
        if config_checks.dali_available():
            dali = dataclasses.replace(p, loader="dali")
            paths[PROCESS + DALI + "1 thread"] = lambda: train_rate(stored, dali, 1)
            paths[PROCESS + DALI + "2 threads"] = lambda: train_rate(stored, dali, 2)
        # Interleaved rounds (A B C ... A B C ...): this machine's speed drifts by tens of
        # percent over minutes, so each path gets its median and the ratio its spread.
        measured = {name: [] for name in paths}
        for _ in range(FLAGS.rounds):
            for name, measure in paths.items():
                measured[name].append(measure())
        rows += [(name, np.median(v), min(v), max(v)) for name, v in measured.items()]
        # Reading on a GPU or TPU host, with and without prepare_backend's malloc: a process
        # each, alternating.
        host = {m: [] for m in MALLOCS}
        for _ in range(FLAGS.rounds):
            for m in MALLOCS:
                host[m].append(host_read(out, batch, 8 * epochs, m))
        for m, label in MALLOCS.items():
            rates = [r for r, _ in host[m]]
            rows.append((HOST_READ + label, np.median(rates), min(rates), max(rates)))
        kept = np.array([r for r, _ in host["kept"]])
        kept_ratio = kept / [r for r, _ in host["system"]]
        faults = {m: np.median([f for _, f in host[m]]) for m in MALLOCS}
        raw_name, paper_name = list(paths)[:2]
        ratios = np.array(measured[paper_name]) / np.array(measured[raw_name])
        one, two = (
            measured[PROCESS + f"train path, paper-256, {t}"] for t in ("1 thread", "2 threads")
        )
        scaling = np.array(two) / np.array(one)
        used = np.array(measured[PROCESS + "reading (used), 2 threads"])
        reads = used / np.array(measured["reading, a record per read call (used)"])
        dali_rows = [PROCESS + DALI + "2 threads", PROCESS + "train path, paper-256, 2 threads"]
        dali_ratio = (
            np.array(measured[dali_rows[0]]) / np.array(measured[dali_rows[1]])
            if dali_rows[0] in measured
            else None
        )
        batched = np.array(measured["reading, array_record's batched read"])
        over_batched = used / batched
        host_over_batched = kept / batched  # round by round

        if config_checks.dali_available():
            pixels = dali_pixels(stored, p, batch)

    if FLAGS.step_batch:
        step = step_rate()
        rows.append((f"train step, paper model, batch {FLAGS.step_batch}, all cores", step))
    loop = loop_seconds_per_step() if FLAGS.loop_steps else None
    print(f"\n{'path':<52} {'images/s':>10}")
    for name, rate, *spread in rows:
        per = "" if "all cores" in name else " per process" if PROCESS in name else " per core"
        rounds = f"  ({spread[0]:,.0f}-{spread[1]:,.0f})" if spread else ""
        print(f"{name.removeprefix(PROCESS):<52} {rate:>10,.0f}{per}{rounds}")
    for what, r in (
        ("paper-256 train path / raw path", ratios),
        ("paper-256 train path, 2 threads / 1 thread", scaling),
        ("reading, 2 threads / 1 thread", reads),
        ("reading, 2 threads / batched read, 1 thread", over_batched),
        ("reading on a GPU/TPU host, freed memory kept / as glibc comes", kept_ratio),
        ("reading on a GPU/TPU host, 2 threads / batched read, 1 thread", host_over_batched),
    ):
        print(f"{what}: {np.median(r):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in r)})")
    print(
        f"page faults per record read there: {faults['system']:.1f} with glibc's malloc as it "
        f"comes, {faults['kept']:.1f} with freed memory kept"
    )
    if dali_ratio is not None:
        rounds = ", ".join(f"{x:.2f}" for x in dali_ratio)
        print(
            f"DALI / tf.data, train path, 2 threads: {np.median(dali_ratio):.2f}x "
            f"(rounds: {rounds})"
        )
    if dali_ratio is not None:
        print(
            "DALI's crops against tf.data's, first batch: {:.2f} grey levels apart on average, "
            "at most {}, {:.0%} of the values equal".format(*pixels)
        )
    if loop is not None:
        print(
            f"training loop, host time per step (1/64 width, batch {loop[2]}): "
            f"{1e3 * loop[0]:.1f} ms, waiting for input {100 * loop[1]:.0f}% of it"
        )
    print(f"(on {os.cpu_count()} cores; {n} train and {len(val)} validation images)")
    print(
        f"paper-256 stores {stored_bytes / 1e3:.1f} KB per image (the JPEGs made here: "
        f"{source_bytes / 1e3:.1f} KB); for ImageNet's 1,331,167 images that would be "
        f"{stored_bytes * 1_331_167 / 1e9:.0f} GB"
    )


def dali_pixels(source, p, batch: int) -> tuple[float, int, float]:
    """How far DALI's crops of a train batch are from tf.data's (the same windows): the mean
    and largest absolute difference, and the share of equal values."""
    from alexnet_jax import loaders

    stream = dict(seed=0, batch_size=batch, start_step=0, num_steps=1, threads=1)
    dali = next(loaders.train_batches(source, dataclasses.replace(p, loader="dali"), **stream))
    tfdata = next(loaders.train_batches(source, dataclasses.replace(p, loader="tf.data"), **stream))
    diff = np.abs(dali.images.astype(int) - tfdata.images)
    return float(diff.mean()), int(diff.max()), float(np.mean(diff == 0))


def loop_seconds_per_step() -> tuple[float, float, int]:
    """launch.py's loop (train.train_and_evaluate) on a model that costs next to nothing:
    seconds per step and the share spent waiting for input, over the log intervals after the
    first (which holds the compilation), and the batch."""
    from alexnet_jax import metrics, train
    from configs import alexnet, digits

    config = digits.get_config()
    config.batch_size = config.optimizer.base_batch_size = alexnet.get_config().batch_size
    steps, every = FLAGS.loop_steps, max(FLAGS.loop_steps // 4, 1)
    config.num_train_steps = steps
    config.log_every_steps = every
    config.eval_every_steps = config.checkpoint_every_steps = steps
    config.model.width = 1 / 64
    config.input.image_size, config.input.resize_size = 67, 72
    config.mesh.data = 1
    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        lines = metrics.read_metrics(workdir)
    timed = [m for m in lines if "train/images_per_sec" in m][1:]
    seconds = np.median([config.batch_size / m["train/images_per_sec"] for m in timed])
    wait = np.median([m["train/data_wait_fraction"] for m in timed])
    return float(seconds), float(wait), config.batch_size


def step_rate() -> float:
    """Images/s of the real Trainer step for the paper model on this machine's devices, fed
    uint8 crops that it normalises with a mean image, as configs/alexnet.py trains."""
    import jax
    from train_step import synthetic_batch  # the sibling benchmark's batch

    from alexnet_jax import parallel, steps
    from configs import alexnet

    config = alexnet.get_config()
    config.batch_size = FLAGS.step_batch
    config.mesh.data = 1
    mesh = parallel.create_mesh(1, 1)
    trainer = steps.Trainer(config, mesh)
    state = trainer.init_state(0)
    batch, consts = synthetic_batch(config, mesh, trainer)
    state, m = trainer.train_step(state, batch, None, consts)  # compile
    jax.block_until_ready(m)
    start, timed = time.perf_counter(), 3
    for _ in range(timed):
        state, m = trainer.train_step(state, batch, None, consts)
    jax.block_until_ready(m)
    return timed * config.batch_size / (time.perf_counter() - start)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
