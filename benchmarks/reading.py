"""Where reading paper-256 records spends its time on this host, measured side by side.

    .venv/bin/python benchmarks/reading.py [--images=1024] [--rounds=3]

Prepares paper-256 records of scikit-learn's photographs (input_pipeline.py's), copies the
training records into shards written with array_record's default compression (zstd) and into
shards holding the JPEG alone (the labels in an array), and times, in a process set up as on a
GPU or TPU host (freed memory kept, glibc's arenas as they come):

- one thread, outside TensorFlow, µs a record: a `pread` of as many bytes at random offsets;
  array_record's read of one record as a range (as records.py reads), as a list of one index,
  and the same range read on the zstd shards; its batched read, per record;
- bare range reads, records/s: one and two threads sharing a reader, one and two processes;
- TensorFlow's half: a batch of records already in memory, handed over by `numpy_function` and
  parsed, on one and two tf.data threads; the same without the parse;
- memory: large NumPy copies on one and two threads, GB/s;
- tf.data reading as records.py reads, one and two threads; the JPEG-alone records, one and two
  threads (the labels gathered from an array); array_record's batched read in one thread, the
  baseline of the ratios.

Interleaved rounds; each row prints its median and, in brackets, its slowest and fastest round.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ importable
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
BATCH, READS = 256, 16  # keys per read call; reads of every record per timing


def _start_and_join(work, args: list[tuple]) -> tuple[float, float]:
    """Run `work(*a)` for each `a` on a thread of its own, all at once: (start, end) on
    perf_counter, CLOCK_MONOTONIC, the same clock in every process."""
    workers = [threading.Thread(target=work, args=a) for a in args]
    start = time.perf_counter()
    [w.start() for w in workers]
    [w.join() for w in workers]
    return start, time.perf_counter()


def _bare_reads(path: str, threads: int, queue=None, barrier=None) -> float:
    """Records/s of range reads of one record each, in a shuffled order, on `threads` threads
    sharing one reader. In a process of `_processes`: the clock starts when every process is
    ready (`barrier`), and (records, start, end) go on `queue`."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path, "readahead_buffer_size:0")
    n = reader.num_records()
    order = np.random.default_rng(0).permutation(n).tolist() * 4 * READS  # processes overlap

    def work(part: list[int]) -> None:
        for i in part:
            reader.read(i, i + 1)

    if barrier is not None:
        barrier.wait()
    start, end = _start_and_join(work, [(order[k::threads],) for k in range(threads)])
    if queue is not None:
        queue.put((len(order), start, end))
    return len(order) / (end - start)


def _processes(path: str, count: int) -> float:
    """Records/s of `count` processes of bare reads together: all their records over the time
    from the first start to the last end."""
    ctx = multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(count)
    procs = [ctx.Process(target=_bare_reads, args=(path, 1, queue, barrier)) for _ in range(count)]
    [p.start() for p in procs]
    done = [queue.get() for _ in procs]
    [p.join() for p in procs]
    return sum(d[0] for d in done) / (max(d[2] for d in done) - min(d[1] for d in done))


def _per_record_us(read, n: int, per_call: int = 1) -> float:
    """µs a record of `read(keys)`, `per_call` keys of a shuffled order a call, one thread."""
    order = np.random.default_rng(1).permutation(n).tolist() * 4
    start = time.perf_counter()
    for k in range(0, len(order), per_call):
        read(order[k : k + per_call])
    return 1e6 * (time.perf_counter() - start) / len(order)


def _copy_rate(threads: int, size: int = 64 << 20, reps: int = 16) -> float:
    """GB/s copied by large NumPy copies (which leave Python's lock) on `threads` threads,
    between buffers already faulted in."""
    pairs = [(np.ones(size, np.uint8), np.ones(size, np.uint8)) for _ in range(threads)]

    def work(src, dst) -> None:
        for _ in range(reps):
            np.copyto(dst, src)

    start, end = _start_and_join(work, pairs)
    return threads * reps * size / (end - start) / 1e9


def main(argv: list[str]) -> None:
    del argv
    from alexnet_jax import backend

    backend.keep_freed_memory(xla_buffers=False)  # as prepare_backend on a GPU or TPU host

    import tensorflow as tf
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from alexnet_jax import paper256, records
    from benchmarks import input_pipeline as bench

    n = FLAGS.images
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench.synthetic_imagenet(root, n, processes=2)
        directory = root / "data" / paper256.NAME / paper256.VERSION
        builder = tfds.builder_from_directory(str(directory))
        files = records.array_record_files(builder, "train")
        serialized = [r for f in files for r in ArrayRecordReader(str(f.filename)).read_all()]
        parsed = tf.io.parse_example(tf.constant(serialized), records.EXAMPLE_SPEC)
        jpegs, labels = parsed["image"].numpy().tolist(), parsed["label"].numpy()

        def write(name: str, items: list[bytes], options: str) -> str:
            writer = ArrayRecordWriter(str(root / name), options)
            for item in items:
                writer.write(item)
            writer.close()
            return str(root / name)

        used = write("used.array_record", serialized, paper256.SHARD_OPTIONS)
        zstd = write("zstd.array_record", serialized, "group_size:1")
        alone = write("jpeg.array_record", jpegs, paper256.SHARD_OPTIONS)
        reader, zstd_reader = (
            ArrayRecordReader(p, "readahead_buffer_size:0") for p in (used, zstd)
        )
        size = int(np.mean([len(r) for r in serialized]))
        fd = os.open(used, os.O_RDONLY)
        offsets = np.random.default_rng(2).integers(0, os.path.getsize(used) - size, n).tolist()

        # tf.data: records.py's reader on the prepared split; the JPEG-alone records; the batched
        # read. Each returns (images, labels) for a batch of keys.
        split = records.RecordSplit(builder, "train", shuffle=False)
        one = lambda p: types.SimpleNamespace(filename=p, skip=0, take=n)
        batched = bench.batched_read([one(used)])
        jpeg_rows = records.ArrayRecordRows([one(alone)])
        label_table = tf.constant(labels.astype(np.int32))

        def batched_fetch(keys):
            out = tf.numpy_function(batched, [keys], tf.string, stateful=False)
            example = tf.io.parse_example(tf.ensure_shape(out, [None]), records.EXAMPLE_SPEC)
            return example["image"], tf.cast(example["label"], tf.int32)

        def jpeg_fetch(keys):
            images = tf.numpy_function(jpeg_rows.read, [keys], tf.string, stateful=False)
            return images, tf.gather(label_table, keys)

        in_memory = np.array(serialized[:BATCH], dtype=object)  # the bytes objects themselves

        def handed_over(parse: bool):
            def fetch(keys):
                give = lambda k: in_memory[: len(k)]
                out = tf.numpy_function(give, [keys], tf.string, stateful=False)
                if not parse:
                    return out, tf.zeros_like(keys, tf.int32)
                example = tf.io.parse_example(tf.ensure_shape(out, [None]), records.EXAMPLE_SPEC)
                return example["image"], tf.cast(example["label"], tf.int32)

            return fetch

        rate = lambda fetch, threads=1: bench.records_rate(fetch, n, BATCH, READS, threads)
        paths = {
            "µs: pread of a record's bytes": lambda: _per_record_us(
                lambda k: os.pread(fd, size, offsets[k[0]]), n
            ),
            "µs: read, a range of one (used)": lambda: _per_record_us(
                lambda k: reader.read(k[0], k[0] + 1), n
            ),
            "µs: read, a list of one index": lambda: _per_record_us(reader.read, n),
            "µs: read, a range of one, zstd shards": lambda: _per_record_us(
                lambda k: zstd_reader.read(k[0], k[0] + 1), n
            ),
            "µs: batched read, per record": lambda: _per_record_us(reader.read, n, BATCH),
            "bare reads, 1 thread": lambda: _bare_reads(used, 1),
            "bare reads, 2 threads": lambda: _bare_reads(used, 2),
            "bare reads, 1 process": lambda: _processes(used, 1),
            "bare reads, 2 processes": lambda: _processes(used, 2),
            "handed to TensorFlow and parsed, 1 thread": lambda: rate(handed_over(True)),
            "handed to TensorFlow and parsed, 2 threads": lambda: rate(handed_over(True), 2),
            "handed to TensorFlow, 1 thread": lambda: rate(handed_over(False)),
            "handed to TensorFlow, 2 threads": lambda: rate(handed_over(False), 2),
            "GB/s: large copies, 1 thread": lambda: _copy_rate(1),
            "GB/s: large copies, 2 threads": lambda: _copy_rate(2),
            "reading (used), 1 thread": lambda: rate(split.fetch),
            "reading (used), 2 threads": lambda: rate(split.fetch, 2),
            "reading, the JPEG alone, 1 thread": lambda: rate(jpeg_fetch),
            "reading, the JPEG alone, 2 threads": lambda: rate(jpeg_fetch, 2),
            "reading, batched read, 1 thread": lambda: rate(batched_fetch),
        }
        for measure in paths.values():
            measure()  # warm-up: readers opened, pipelines traced, heaps grown
        for _ in range(FLAGS.rounds):
            for name, measure in paths.items():
                rows.setdefault(name, []).append(measure())
        os.close(fd)

    print(f"\n{'what':<48} {'median':>10}  (slowest-fastest round)")
    for name, values in rows.items():
        unit, _, what = name.partition(": ") if ": " in name else ("records/s", "", name)
        slow, fast = (max(values), min(values)) if unit == "µs" else (min(values), max(values))
        f = ",.0f" if unit == "records/s" else ".1f"
        print(f"{what:<48} {np.median(values):>10{f}} {unit}  ({slow:{f}}-{fast:{f}})")
    base = np.array(rows["reading, batched read, 1 thread"])
    for name in ("reading (used), 2 threads", "reading, the JPEG alone, 2 threads"):
        r = np.array(rows[name]) / base
        print(
            f"{name} / batched read, 1 thread: {np.median(r):.2f}x "
            f"(rounds: {', '.join(f'{x:.2f}' for x in r)})"
        )
    print(f"(on {os.cpu_count()} cores; {n} records of {size / 1e3:.1f} KB on average)")


if __name__ == "__main__":
    flags.DEFINE_integer("images", 1024, "Training images to make and read.")
    flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
    app.run(main)
