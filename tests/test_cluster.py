"""cluster.py: the devices and input cores each process is given under SLURM and other
launchers, and the launches refused."""

import os
import types

import jax
import pytest

from alexnet_jax import UsageError, cluster


def _slurm(ntasks, per_node, localid, nodeid=0, **extra):
    """The environment srun gives one task of a job spread evenly over ntasks // per_node nodes."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu[001-004]",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": str(nodeid * per_node + localid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{ntasks // per_node})",
        **extra,
    }


def _args(env, gpus, flags=(None, None, None), tpu=False):
    return cluster.distributed_args(*flags, env, gpus, tpu=tpu)


def test_one_task_per_node_drives_every_gpu_of_its_node():
    env = _slurm(4, 1, 0, nodeid=2)  # srun --nodes=4 --ntasks-per-node=1, 8 GPUs each
    assert _args(env, 8) == {"local_device_ids": list(range(8))}  # JAX: [SLURM_LOCALID] = [0]


def test_one_task_per_gpu():
    # --gpus-per-task=1: SLURM binds one GPU, which is ordinal 0 in the task (JAX: 5, invalid).
    env = _slurm(32, 8, 5, nodeid=1, SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES="5")
    assert _args(env, cluster.visible_gpus(env)) == {"local_device_ids": [0]}
    # No binding: the 8 tasks of a node share its 8 GPUs and each takes its own.
    assert _args(_slurm(32, 8, 5, nodeid=1), 8) == {"local_device_ids": [5]}
    assert _args(_slurm(8, 2, 1), 8) == {"local_device_ids": [4, 5, 6, 7]}
    unknown = {k: v for k, v in _slurm(8, 8, 5).items() if k != "SLURM_STEP_TASKS_PER_NODE"}
    assert _args(unknown, 8) == {"local_device_ids": None}  # JAX's own choice, [5]
    with pytest.raises(UsageError, match="3 processes on this node share its 8 GPUs"):
        _args(_slurm(6, 3, 0), 8)


def test_jax_fills_in_the_rest_from_slurm_and_keeps_the_devices(monkeypatch):
    from jax._src.clusters import ClusterEnv

    env = _slurm(4, 1, 0, nodeid=2)
    monkeypatch.setattr(os, "environ", env)
    mine = _args(env, 8)["local_device_ids"]
    coordinator, n, pid, ids = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, mine, None, 300
    )
    assert (coordinator.split(":")[0], n, pid, ids) == ("gpu001", 4, 2, list(range(8)))
    jax_own = ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 300)
    assert jax_own[3] == [0]  # what JAX alone would give: one GPU of the eight


def test_explicit_flags_get_the_same_devices():
    flags = ("host0:1234", 4, 2)
    want = {"coordinator_address": "host0:1234", "num_processes": 4, "process_id": 2}
    assert _args({}, None, flags) == {**want, "local_device_ids": None}
    assert _args({}, 4, flags) == {**want, "local_device_ids": [0, 1, 2, 3]}
    torchrun = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert _args(torchrun, 8, flags) == {**want, "local_device_ids": [6, 7]}
    assert _args(_slurm(4, 1, 0), 8, flags)["local_device_ids"] == list(range(8))
    # JAX reads JAX_LOCAL_DEVICE_IDS itself when we pass none.
    assert _args({"JAX_LOCAL_DEVICE_IDS": "1"}, 8, flags)["local_device_ids"] is None


def test_single_processes_and_tpu_slices():
    assert _args({}, 8) is None  # one process: every visible device, no jax.distributed
    assert _args(_slurm(1, 1, 0), 8) is None
    assert _args(_slurm(8, 8, 5, PMI_SIZE="8"), 8) == {"local_device_ids": [5]}  # srun --mpi
    assert _args({}, None, tpu=True) == {}  # JAX finds the slice
    assert _args({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "x"}, None) == {
        "local_device_ids": None
    }


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"},
            "batch script of a SLURM job of 4 tasks, run without srun",
        ),
        ({"WORLD_SIZE": "4", "RANK": "1"}, "4 processes were started by a torchrun-style"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "2 processes were started by Open MPI"),
        ({"PMI_SIZE": "3"}, "--num_processes=3 and --process_id=its rank"),
    ],
)
def test_launches_jax_cannot_join_up_are_refused(env, message):
    with pytest.raises(UsageError, match=message):
        _args(env, None)


def test_a_process_without_its_gpus_is_refused(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    gpu = types.SimpleNamespace(platform="gpu")
    monkeypatch.setattr(jax, "local_devices", lambda: [gpu] * 8)
    cluster.initialize({"local_device_ids": list(range(8))})
    assert calls == [{"local_device_ids": list(range(8))}]
    monkeypatch.setattr(jax, "local_devices", lambda: [types.SimpleNamespace(platform="cpu")])
    with pytest.raises(UsageError, match="should drive GPUs \\[0, 1\\] but JAX sees 1 cpu"):
        cluster.initialize({"local_device_ids": [0, 1]})


def test_visible_gpus():
    assert cluster.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert cluster.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert cluster.visible_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == 0


def test_input_threads_are_this_process_share_of_the_host(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)))
    assert cluster.input_threads({}) == 64  # alone
    assert cluster.input_threads(_slurm(32, 8, 3)) == 8  # 8 processes share the node
    assert cluster.input_threads({"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(6)))
    assert cluster.input_threads(_slurm(32, 8, 3)) == 6  # pinned by --cpus-per-task


def test_an_accelerator_process_with_too_few_input_cores_is_warned():
    # SLURM without --cpus-per-task binds each task to one core.
    warning = cluster.few_input_cores(1, 1, "gpu")
    assert "--cpus-per-task" in warning and "1 host core(s) for its 1 gpu device(s)" in warning
    assert cluster.few_input_cores(15, 8, "gpu") is not None  # 8 GPUs want 16 cores
    assert cluster.few_input_cores(16, 8, "gpu") is None
    assert cluster.few_input_cores(2, 4, "tpu") is not None
    assert cluster.few_input_cores(1, 8, "cpu") is None  # CPU devices share the host's cores


def _host(root, *paths, pci=None):
    """A fake host file system under `root`: empty files at `paths`, and PCI devices
    {name: (vendor, class)}."""
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text("")
    for name, (vendor, cls) in (pci or {}).items():
        d = root / "sys/bus/pci/devices" / name
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "class").write_text(cls + "\n")
    return str(root)


def test_host_accelerators_are_read_from_the_file_system(tmp_path):
    none = lambda name: None
    assert cluster.host_accelerators(_host(tmp_path / "bare"), none) == {}
    bridge = {"0000:00:01.0": ("0x10de", "0x068000"), "0000:00:02.0": ("0x8086", "0x030000")}
    assert cluster.host_accelerators(_host(tmp_path / "nic", pci=bridge), none) == {}
    gpu = _host(tmp_path / "gpu", "dev/nvidia0", "dev/nvidia1", "dev/nvidiactl")
    assert cluster.host_accelerators(gpu, none) == {"gpu": "/dev/nvidia0"}
    driver = _host(tmp_path / "driver", "proc/driver/nvidia/version")
    assert cluster.host_accelerators(driver, none) == {"gpu": "/proc/driver/nvidia/version"}
    pci = {"0000:3b:00.0": ("0x10de", "0x030200")}
    assert cluster.host_accelerators(_host(tmp_path / "pci", pci=pci), none) == {
        "gpu": "PCI device 0000:3b:00.0"
    }
    smi = cluster.host_accelerators(_host(tmp_path / "smi"), lambda n: f"/usr/bin/{n}")
    assert smi == {"gpu": "/usr/bin/nvidia-smi"}
    tpu = {"0000:00:04.0": ("0x1ae0", "0x120000")}  # a TPU v5e chip
    assert cluster.host_accelerators(_host(tmp_path / "tpu", pci=tpu), none) == {
        "tpu": "PCI device 0000:00:04.0"
    }
    v4 = cluster.host_accelerators(_host(tmp_path / "v4", "dev/accel0"), none)
    assert v4 == {"tpu": "/dev/accel0"}


def test_the_cpu_beside_an_idle_accelerator_is_refused_in_one_line():
    gpu, tpu = {"gpu": "/dev/nvidia0"}, {"tpu": "/dev/accel0"}
    problem = cluster.idle_accelerator("cpu", gpu, {})
    assert len(problem.splitlines()) == 1
    assert "NVIDIA GPU (/dev/nvidia0)" in problem and "JAX's CPU build is installed" in problem
    assert 'pip install -c constraints.txt -e ".[cuda12]"' in problem and "--allow_cpu" in problem
    plugin = cluster.idle_accelerator("cpu", gpu, {}, {"xla_cuda12"})
    assert "xla_cuda12 plugin is installed but did not start" in plugin
    on_tpu = cluster.idle_accelerator("cpu", tpu, {}, {"xla_cuda12"})
    assert '-e ".[tpu]"' in on_tpu and "CPU build" in on_tpu
    # What is not an oversight: JAX on the accelerator, the CPU chosen, the GPUs hidden, none.
    assert cluster.idle_accelerator("gpu", gpu, {}) is None
    assert cluster.idle_accelerator("tpu", tpu, {}) is None
    assert cluster.idle_accelerator("cpu", gpu, {"JAX_PLATFORMS": "cpu"}) is None
    assert cluster.idle_accelerator("cpu", gpu, {"CUDA_VISIBLE_DEVICES": ""}) is None
    assert cluster.idle_accelerator("cpu", tpu, {"CUDA_VISIBLE_DEVICES": ""}) is not None
    assert cluster.idle_accelerator("cpu", {}, {}) is None


def test_check_backend_refuses_unless_allowed(monkeypatch):
    monkeypatch.setattr(cluster, "host_accelerators", lambda: {"gpu": "/dev/nvidia0"})
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert jax.default_backend() == "cpu"
    with pytest.raises(UsageError, match="JAX computes on the CPU, but this host has an NVIDIA"):
        cluster.check_backend()
    cluster.check_backend(allow_cpu=True)
    monkeypatch.setattr(cluster, "host_accelerators", lambda: {})
    cluster.check_backend()  # a host without an accelerator trains on its CPU as ever
