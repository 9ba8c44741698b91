"""cluster.py: the devices each process is given under SLURM and other launchers, the launches
refused, XLA flags, and workdirs that are URLs."""

import json
import os
import platform
import subprocess
import sys
import types

import jax
import pytest
from conftest import CACHE, REPO, tiny_config, tiny_flags
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing

from alexnet_jax import UsageError, backend, cluster, lifecycle, train


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


def test_xla_flags_add_ours_and_keep_the_users():
    gpu, cpu = backend.GPU_XLA_FLAGS[0], backend.CPU_XLA_FLAGS[0]
    assert backend.xla_flags("") == f"{gpu} {cpu}"
    assert backend.xla_flags("--xla_force_host_platform_device_count=4") == (
        f"--xla_force_host_platform_device_count=4 {gpu} {cpu}"
    )
    mine = gpu.replace("=true", "=false")
    assert backend.xla_flags(mine) == f"{mine} {cpu}"
    ynn = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"  # a user's choice stays
    assert backend.xla_flags(ynn) == f"{ynn} {gpu}"
    assert backend.dispatch_depth("cpu") == 1 and backend.dispatch_depth("gpu") > 1


def test_on_the_cpu_ynnpack_runs_the_dots_and_not_the_convolutions():
    """The flags conftest.py set as launch.py does: dense layers' dots go to YNNPACK, the
    convolutions stay with XLA's own kernels (see backend.CPU_XLA_FLAGS)."""
    import re

    import jax.numpy as jnp

    def fusions(f, *args) -> list[str]:
        text = jax.jit(f).lower(*args).compile().as_text()
        return re.findall(r'"kind":"(__ynn_fusion)"', text)

    x, k = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 4))
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    a = jnp.ones((64, 256))
    assert fusions(lambda a: jnp.maximum(a @ a.T, 0.0), a) and not fusions(conv, x, k)


_FAULTS = """
import resource, sys
sys.path[:0] = ["benchmarks", "."]
from alexnet_jax import backend
kept = backend.prepare_backend(cpu_malloc=sys.argv[1] == "kept")
import jax
from alexnet_jax import parallel, train
from configs import alexnet
from train_step import synthetic_batch
config = alexnet.get_config()
config.batch_size, config.mesh.data, config.mesh.model = 16, 1, 1
mesh = parallel.create_mesh(1, 1)
trainer = train.Trainer(config, mesh)
state, sums = trainer.init_state(0), trainer.zero_sums()
batch, consts = synthetic_batch(config, mesh, trainer)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, out = trainer.train_step(state, batch, sums, consts)
    jax.block_until_ready(out)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[2:]), float(out["loss"]), float(state.params["fc8"]["kernel"].sum()))
"""


def _faults(malloc: str) -> tuple[str, int, str, str]:
    """Page faults in steps 3-10 of the paper model's real step at batch 16, and the last
    step's loss and a parameter sum."""
    r = subprocess.run(
        [sys.executable, "-c", _FAULTS, malloc], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    kept, faults, loss, fc8 = r.stdout.split()
    return kept, int(faults), loss, fc8


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_on_the_cpu_the_step_reuses_freed_memory_instead_of_faulting_it_in():
    """XLA's CPU backend allocates each run's buffers anew; with glibc as it comes, the large
    ones are fresh mmaps whose pages fault in on every step (about 120,000 a step here);
    keep_freed_memory lets the next step reuse them (now and then glibc still grows its heap
    for one step)."""
    system, kept = _faults("system"), _faults("kept")
    assert system[0] == "False" and kept[0] == "True"
    assert system[1] > 8 * 50_000  # the test can tell: every step faulted its buffers in
    assert kept[1] < system[1] / 4
    assert kept[2:] == system[2:]  # the same steps, to the bit


def test_malloc_is_kept_only_where_jax_computes_on_the_cpu(monkeypatch):
    assert backend.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert not backend.runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not backend.runs_on_cpu({"JAX_PLATFORMS": "tpu"})
    monkeypatch.setattr(backend.metadata, "entry_points", lambda group: ["xla_cuda12"])
    assert not backend.runs_on_cpu({})  # an accelerator plugin installed
    monkeypatch.setattr(backend.metadata, "entry_points", lambda group: [])
    assert backend.runs_on_cpu({})


# --------------------------------------------------------------------------------- workdirs


def test_workdir_urls_stay_urls():
    assert os.fspath(lifecycle.workdir_path("gs://bucket/run") / "checkpoints") == (
        "gs://bucket/run/checkpoints"
    )
    home = os.path.expanduser("~")
    assert os.fspath(lifecycle.workdir_path("~/run")) == os.path.join(home, "run")
    assert os.path.isabs(lifecycle.workdir_path("relative/run"))


def test_the_compilation_cache_may_be_a_url():
    assert backend.compilation_cache_dir("gs://bucket/xla") == "gs://bucket/xla"
    assert backend.compilation_cache_dir("~/xla") == os.path.join(os.path.expanduser("~"), "xla")
    assert backend.compilation_cache_dir("") is None


def _redirect(root):
    """mock_epath functions that send gs://... to the local directory `root`."""

    def local(path):
        text = os.fspath(path)
        assert not text.startswith("/gs/"), text  # a URL mangled into a local path
        return text.replace("gs://", f"{root}/", 1) if text.startswith("gs://") else text

    def paths_first(n):
        return lambda fn, *a, **k: fn(*[local(p) for p in a[:n]], *a[n:], **k)

    fns = "exists glob isdir listdir makedirs mkdir open remove rmtree stat walk".split()
    return {
        **{f: paths_first(1) for f in fns},
        **{f: paths_first(2) for f in ("rename", "replace", "copy")},
    }


def test_a_gs_workdir_reaches_every_writer_as_a_url(tmp_path, monkeypatch):
    """A run with --workdir=gs://bucket/run, its gs:// traffic sent to tmp_path/bucket: Orbax,
    TensorBoard, metrics.jsonl and the statistics cache each get the URL (Orbax's array
    writes go through TensorStore, so its directory is redirected after it is recorded)."""
    from alexnet_jax import checkpoint, metrics

    seen = {}
    real_manager, real_tb = checkpoint.ocp.CheckpointManager, metrics.tf.summary.create_file_writer

    def manager(directory, **kw):
        seen["orbax"] = os.fspath(directory)
        return real_manager(os.fspath(directory).replace("gs://", f"{tmp_path}/"), **kw)

    def tb(logdir, *a, **kw):
        seen["tensorboard"] = logdir
        return real_tb(logdir.replace("gs://", f"{tmp_path}/"), *a, **kw)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", manager)
    monkeypatch.setattr(metrics.tf.summary, "create_file_writer", tb)
    monkeypatch.chdir(tmp_path)  # a URL mangled into a relative path would land here
    # With TensorFlow installed etils sends gs:// to tf.io.gfile, around mock_epath's backend.
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
    config = tiny_config(num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2)
    with epath_testing.mock_epath(**_redirect(tmp_path)):
        train.train_and_evaluate(config, "gs://bucket/run")
    assert seen == {
        "orbax": "gs://bucket/run/checkpoints",
        "tensorboard": "gs://bucket/run/tensorboard",
    }
    run = tmp_path / "bucket" / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2]
    assert (run / "input_stats.json").exists() and (run / "checkpoints" / "2").is_dir()
    assert not (tmp_path / "gs:").exists()


@pytest.mark.slow  # two processes through launch.py
def test_processes_with_different_workdirs_are_refused(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "launch.py"),
                f"--config={REPO / 'configs/digits.py'}",
                f"--workdir={tmp_path / f'own{i}'}",  # each its own: not shared
                f"--compilation_cache_dir={CACHE}",
                f"--coordinator_address={addr}",
                "--num_processes=2",
                f"--process_id={i}",
                *tiny_flags(num_train_steps=1),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 2, err[-2000:]
        assert "processes [1] do not see what process 0 wrote in --workdir=" in err
    assert not (tmp_path / "own0" / "checkpoints").exists()  # refused before anything is saved


def test_input_threads_are_this_process_share_of_the_host(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)))
    assert cluster.input_threads({}) == 64  # alone
    assert cluster.input_threads(_slurm(32, 8, 3)) == 8  # 8 processes share the node
    assert cluster.input_threads({"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(6)))
    assert cluster.input_threads(_slurm(32, 8, 3)) == 6  # pinned by --cpus-per-task
