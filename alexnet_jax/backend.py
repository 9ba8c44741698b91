"""What to set before JAX starts a backend, and how far the host may run ahead of it: XLA's
flags, glibc's malloc, TensorFlow kept off the GPUs, the persistent compilation cache and the
dispatch depth.

Imports no JAX: launch.py, the tests and the benchmarks call `prepare_backend` before anything
starts a backend, as XLA reads its flags and glibc its arena settings only once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Iterator, Mapping
from importlib import metadata, util

from alexnet_jax import paths

GPU_XLA_FLAGS = (
    # Let XLA move collectives (the data-parallel gradient all-reduce, the towers' all-gathers)
    # to overlap with the convolutions around them; NVIDIA's JAX containers set it by default.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
)
CPU_XLA_FLAGS = (
    # XLA's CPU backend hands convolutions and dots to YNNPACK by default. Its own Eigen
    # convolutions run the train step faster (conv1's weight gradient above all), YNNPACK's
    # dots the dense layers: YNNPACK takes the dots only (docs/performance.md).
    "--xla_cpu_experimental_ynn_fusion_type=dot",
)


def xla_flags(user: str, cpu: bool = True) -> str:
    """`user`'s XLA_FLAGS plus ours (the CPU ones unless `cpu` is False), leaving any flag the
    user set to the user's value. (Every XLA build knows the GPU and CPU flags, so each is
    harmless on the other backends.)"""
    given = {f.split("=", 1)[0] for f in user.split()}
    flags = GPU_XLA_FLAGS + (CPU_XLA_FLAGS if cpu else ())
    ours = [f for f in flags if f.split("=", 1)[0] not in given]
    return " ".join([user.strip(), *ours]).strip()


def set_xla_flags(cpu: bool = True) -> None:
    """Put `xla_flags` into the environment: call it before anything starts a backend (XLA
    reads its flags once)."""
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), cpu)


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters


def runs_on_cpu(env: Mapping[str, str]) -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS names it first, or no accelerator
    plugin (jax_plugins entry points, libtpu) is installed."""
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not metadata.entry_points(group="jax_plugins") and util.find_spec("libtpu") is None


def keep_freed_memory(xla_buffers: bool = True) -> bool:
    """Make glibc's malloc keep the memory this process frees, for its next use.

    The input pipeline frees each batch's records (tens of KB each) as the next batch's are
    read; glibc gives the top of its heaps back to the kernel, which faults the pages in and
    zeroes them again for the next batch (docs/imagenet.md gives the faults and the rates).
    So the heaps are never trimmed, on every backend.
    `xla_buffers` (where JAX computes on the CPU): XLA's CPU backend allocates every buffer of
    every run of a program with posix_memalign, from its worker threads. glibc serves the large
    ones with a fresh mmap, faulted in and taken back every step. With one arena for all
    threads (a thread's own arena can only mmap that much) and no mmap, the step reuses last
    step's pages (docs/performance.md).
    The cost: memory once freed stays with the process, for its next use.
    Call it before the backend starts: once its worker threads hold an arena it is too late.
    Returns whether the settings took (glibc on Linux only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    settings = [(_M_TRIM_THRESHOLD, -1)]  # -1: never
    settings += [(_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0)] if xla_buffers else []
    return all(_mallopt(param, value) for param, value in settings)


def _mallopt(param: int, value: int) -> bool:
    return ctypes.CDLL(None).mallopt(param, value) == 1


def prepare_backend(cpu_flags: bool = True, malloc: bool = True) -> bool:
    """Everything to set before a backend starts: our XLA flags (the CPU's only when JAX will
    compute on the CPU, and `cpu_flags`), `keep_freed_memory` (unless `malloc` is False), for
    XLA's buffers too when JAX computes on the CPU, and `hide_gpus_from_tensorflow`. Returns
    whether freed memory is now kept."""
    on_cpu = runs_on_cpu(os.environ)
    set_xla_flags(cpu_flags and on_cpu)
    kept = malloc and keep_freed_memory(xla_buffers=on_cpu)
    hide_gpus_from_tensorflow()  # after malloc's settings: importing TensorFlow starts threads
    return kept


def hide_gpus_from_tensorflow() -> bool:
    """Keep TensorFlow, which is only the host's input pipeline, off the GPUs' memory (a
    TensorFlow build with CUDA would otherwise reserve it), before its runtime starts. Where
    TensorFlow is not installed (a device check with JAX's stack alone) there is nothing to
    hide; returns whether TensorFlow was told."""
    with _stderr_silenced():  # TensorFlow's C++ start-up notices (oneDNN's, absl's)
        try:
            import tensorflow as tf
        except ImportError:
            return False
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # its runtime started earlier in this process: as it is by now
            return False
    return True


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null (C++ libraries write there, below Python's
    sys.stderr), and restored."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def compilation_cache_dir(path: str) -> str | None:
    """--compilation_cache_dir as JAX should get it: None for '' (off), a URL as given (JAX
    writes through etils.epath too), a local path with ~ expanded."""
    if not path:
        return None
    return paths.local_or_url(path)


def dispatch_depth(backend: str) -> int:
    """Train steps the host may dispatch before waiting for the oldest. XLA's CPU collectives
    deadlocked with unbounded dispatch (see metrics.InFlight); accelerators need a step or
    two queued to stay busy while the host prepares the next batch."""
    return 1 if backend == "cpu" else 2
