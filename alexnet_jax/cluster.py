"""How a run meets its machines: which processes start `jax.distributed` and which devices and
host cores each one drives (SLURM, Open MPI, Cloud TPU, explicit flags), and the start-up checks
that every process sees the devices it should and that JAX did not leave the host's
accelerators idle for its CPU.

Everything here runs before the model exists; parallel.py decides what the devices then hold.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from collections.abc import Callable, Collection, Mapping
from importlib import metadata, util
from typing import Any

import jax

from alexnet_jax.errors import UsageError


def visible_gpus(env: Mapping[str, str]) -> int | None:
    """How many NVIDIA GPUs this process may use, read before JAX starts (None: unknown)."""
    spec = env.get("CUDA_VISIBLE_DEVICES")
    if spec is not None:
        ids = [s for s in spec.split(",") if s.strip()]
        return 0 if spec.strip() == "NoDevFiles" else len(ids)
    return len(glob.glob("/dev/nvidia[0-9]*")) or None


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """This node's entry of SLURM's tasks-per-node list, e.g. '2(x3),1' -> 2, 2, 2, 1."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m[1])] * int(m[2] or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else None


def _node_view(env: Mapping[str, str]) -> tuple[int, int, bool] | None:
    """(processes on this node, this one's local rank, whether the launcher bound GPUs to each
    process) as SLURM, Open MPI or torchrun-style launchers say; None when none does."""
    if "SLURM_STEP_NODELIST" in env and "SLURM_LOCALID" in env:
        tasks = _slurm_tasks_on_node(env)
        bound = "SLURM_GPUS_PER_TASK" in env
        return (tasks, int(env["SLURM_LOCALID"]), bound) if tasks else None
    for size, rank in (
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("LOCAL_WORLD_SIZE", "LOCAL_RANK"),
    ):
        if size in env and rank in env:
            return int(env[size]), int(env[rank]), False
    return None


def local_device_ids(env: Mapping[str, str], gpus: int | None) -> list[int] | None:
    """The GPU ordinals this process drives: all it sees when it is alone on its node or its
    GPUs were bound to it, else its equal share of the node's. None leaves the choice to JAX
    (no GPUs seen, or the user set JAX_LOCAL_DEVICE_IDS, which JAX reads itself)."""
    if not gpus or "JAX_LOCAL_DEVICE_IDS" in env:
        return None
    view = _node_view(env)
    if view is None:  # alone as far as anyone says; under srun, trust JAX's per-rank choice
        return None if "SLURM_STEP_NODELIST" in env else list(range(gpus))
    tasks, rank, bound = view
    if tasks == 1 or bound or gpus < tasks:  # gpus < tasks: each was given its own few
        return list(range(gpus))
    if gpus % tasks:
        raise UsageError(
            f"{tasks} processes on this node share its {gpus} GPUs, which do not divide "
            f"evenly: start one process per node (it drives every GPU), one per GPU "
            f"(--ntasks-per-node={gpus}), or bind GPUs with --gpus-per-task."
        )
    share = gpus // tasks
    return list(range(rank * share, (rank + 1) * share))


def _undetected_launch(env: Mapping[str, str]) -> str | None:
    """One line when several processes were started in a way JAX cannot join up itself."""
    if "SLURM_STEP_NODELIST" in env:
        return None  # srun, which JAX detects (it may also set PMI_SIZE)
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return (
            f"this is the batch script of a SLURM job of {env['SLURM_NTASKS']} tasks, run "
            "without srun: start the processes with `srun python launch.py ...` inside it"
        )
    for size, launcher in (
        ("OMPI_COMM_WORLD_SIZE", "Open MPI"),
        ("PMI_SIZE", "an MPI launcher"),
        ("WORLD_SIZE", "a torchrun-style launcher"),
    ):
        if int(env.get(size, "1")) > 1 and not (
            launcher == "Open MPI" and "OMPI_MCA_orte_hnp_uri" in env  # Open MPI 4: JAX finds it
        ):
            return (
                f"{env[size]} processes were started by {launcher} ({size}), which JAX does not "
                "detect: give each --coordinator_address=HOST:PORT (of process 0), "
                f"--num_processes={env[size]} and --process_id=its rank"
            )
    return None


def input_threads(env: Mapping[str, str]) -> int:
    """Host cores for this process's input pipeline: the cores it is pinned to (SLURM's
    --cpus-per-task pins them), or its equal share of the node's when processes share them."""
    cores = len(os.sched_getaffinity(0))
    view = _node_view(env)
    if view is not None and cores == os.cpu_count():  # not pinned: the node's processes share
        cores //= view[0]
    return max(cores, 1)


def few_input_cores(threads: int, local_devices: int, backend: str) -> str | None:
    """A warning when an accelerator process's input has fewer than 2 host cores per local
    device (SLURM binds a task to one core unless --cpus-per-task says otherwise), else None."""
    if backend == "cpu" or threads >= 2 * local_devices:
        return None
    return (
        f"this process's input runs on {threads} host core(s) for its {local_devices} "
        f"{backend} device(s), fewer than 2 per device: decoding may not keep up. Give each "
        "process more cores: under SLURM, srun --cpus-per-task=C (the node's cores divided by "
        "--ntasks-per-node); elsewhere, pin it to more cores (taskset) or run fewer processes "
        "per node."
    )


def distributed_args(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    env: Mapping[str, str],
    gpus: int | None,
    tpu: bool = False,
) -> dict[str, Any] | None:
    """The keyword arguments for jax.distributed.initialize, or None for a single process.

    Arguments JAX detects itself (SLURM's srun, Open MPI 4, Cloud TPU) are left out, except the
    devices: JAX gives each SLURM or Open MPI process only the GPU numbered by its local rank,
    which leaves all but one GPU of a one-process-per-node job idle and names a GPU that does
    not exist when the launcher already bound one GPU to each process.
    """
    given = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    missing = [k for k, v in given.items() if v is None]
    if 0 < len(missing) < 3:
        set_ = [k for k in given if k not in missing]
        raise UsageError(
            f"{', '.join(set_)} given without {', '.join(missing)}: a multi-process run needs "
            "all three (or none, under srun, Open MPI and on Cloud TPU, where JAX finds them)."
        )
    ids = {"local_device_ids": local_device_ids(env, gpus)}
    if not missing:
        return {
            "coordinator_address": coordinator_address,
            "num_processes": num_processes,
            "process_id": process_id,
            **ids,
        }
    if problem := _undetected_launch(env):
        raise UsageError(problem + ".")
    if "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return ids
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return ids
    if tpu:
        return {}
    return None


def initialize(args: dict[str, Any] | None) -> None:
    """Start jax.distributed with `args` (see distributed_args), then refuse a process whose
    devices are not the ones it was given."""
    if args is not None:
        jax.distributed.initialize(**args)
    wanted = (args or {}).get("local_device_ids")
    if wanted is None:
        return
    devices = jax.local_devices()
    if devices[0].platform != "gpu" or len(devices) != len(wanted):
        raise UsageError(
            f"this process should drive GPUs {wanted} but JAX sees {len(devices)} "
            f"{devices[0].platform} device(s): {INSTALL['gpu']}; or set CUDA_VISIBLE_DEVICES to "
            "the GPUs this process may use."
        )


def describe() -> str:
    """Processes, the backend, this one's devices (kind and ids) and all devices, for the first
    lines of every log."""
    local = jax.local_devices()
    return (
        f"process {jax.process_index()} of {jax.process_count()}: {len(local)} local "
        f"{local[0].platform} device(s) {[d.id for d in local]} ({local[0].device_kind}), "
        f"{jax.device_count()} in all"
    )


# The installs of JAX's accelerator builds (pyproject.toml's extras), for the one-line errors.
INSTALL = {
    "gpu": (
        'install JAX\'s CUDA build: pip install -c constraints.txt -e ".[cuda12]" (NVIDIA '
        'driver 525 or newer), or ".[cuda13]" (driver 580 or newer)'
    ),
    "tpu": 'install JAX\'s TPU build: pip install -c constraints.txt -e ".[tpu]" (libtpu)',
}
_NAMES = {"gpu": "an NVIDIA GPU", "tpu": "a TPU"}
_PCI_VENDORS = {"0x10de": "gpu", "0x1ae0": "tpu"}  # NVIDIA; Google (TPU chips)


def host_accelerators(
    root: str = "/", which: Callable[[str], str | None] = shutil.which
) -> dict[str, str]:
    """The accelerators this host has, whatever JAX made of them: {'gpu' | 'tpu': what shows
    it}. Read from the file system under `root`: NVIDIA's device files and driver, the PCI
    devices of NVIDIA (display and 3D controllers) and Google (TPU chips), TPU VMs' /dev/accel*;
    and `which('nvidia-smi')`."""
    found: dict[str, str] = {}
    for pattern, kind in (("dev/nvidia[0-9]*", "gpu"), ("dev/accel[0-9]*", "tpu")):
        paths = sorted(glob.glob(os.path.join(root, pattern)))
        if paths:
            found.setdefault(kind, "/" + os.path.relpath(paths[0], root))
    if os.path.exists(os.path.join(root, "proc/driver/nvidia/version")):
        found.setdefault("gpu", "/proc/driver/nvidia/version")
    for device in sorted(glob.glob(os.path.join(root, "sys/bus/pci/devices/*"))):
        kind = _PCI_VENDORS.get(_read(os.path.join(device, "vendor")))
        if kind == "gpu" and not _read(os.path.join(device, "class")).startswith("0x03"):
            continue  # an NVIDIA bridge or switch, not a GPU
        if kind:
            found.setdefault(kind, f"PCI device {os.path.basename(device)}")
    smi = which("nvidia-smi")
    if smi:
        found.setdefault("gpu", smi)
    return found


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def installed_plugins() -> set[str]:
    """JAX's accelerator plugins installed in this environment (jax_plugins entry points, and
    libtpu)."""
    names = {e.name for e in metadata.entry_points(group="jax_plugins")}
    return names | ({"libtpu"} if util.find_spec("libtpu") is not None else set())


def idle_accelerator(
    backend: str,
    found: Mapping[str, str],
    env: Mapping[str, str],
    plugins: Collection[str] = (),
) -> str | None:
    """One line when JAX computes on the CPU (`backend`) beside an accelerator the host has
    (`found`, host_accelerators) that JAX did not take, else None. GPUs hidden from the process
    (CUDA_VISIBLE_DEVICES empty) and a CPU named in JAX_PLATFORMS are choices, not oversights."""
    if backend != "cpu" or env.get("JAX_PLATFORMS", "").split(",")[0].strip() == "cpu":
        return None
    hidden = env.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1", "NoDevFiles")
    kind = next((k for k in ("tpu", "gpu") if k in found and not (k == "gpu" and hidden)), None)
    if kind is None:
        return None
    own = sorted(p for p in plugins if ("cuda" in p) == (kind == "gpu"))
    why = (
        f"JAX's {', '.join(own)} plugin is installed but did not start (its warning above says "
        "why: often a driver older than it needs)"
        if own
        else "JAX's CPU build is installed"
    )
    return (
        f"JAX computes on the CPU, but this host has {_NAMES[kind]} ({found[kind]}) that JAX did "
        f"not take: {why}. To train on it, {INSTALL[kind]}. To train on the CPU on purpose, pass "
        "--allow_cpu (or set JAX_PLATFORMS=cpu)."
    )


def check_backend(allow_cpu: bool = False) -> None:
    """Refuse to run on the CPU beside an accelerator JAX did not take (see idle_accelerator),
    unless `allow_cpu`; call it before anything compiles."""
    if allow_cpu:
        return
    problem = idle_accelerator(
        jax.default_backend(), host_accelerators(), os.environ, installed_plugins()
    )
    if problem:
        raise UsageError(problem)
