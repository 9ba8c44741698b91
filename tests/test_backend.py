"""backend.py: the XLA flags and malloc settings set before JAX starts, where they apply, and
what they do to the compiled step."""

import os
import platform
import subprocess
import sys

import jax
import pytest
from conftest import REPO

from alexnet_jax import backend


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
kept = backend.prepare_backend(malloc=sys.argv[1] == "kept")
import jax
from alexnet_jax import parallel, steps, train
from configs import alexnet
from train_step import synthetic_batch
config = alexnet.get_config()
config.batch_size, config.mesh.data, config.mesh.model = 16, 1, 1
mesh = parallel.create_mesh(1, 1)
trainer = steps.Trainer(config, mesh)
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


def test_jax_computes_on_the_cpu_unless_an_accelerator_is_named_or_installed(monkeypatch):
    assert backend.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert not backend.runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not backend.runs_on_cpu({"JAX_PLATFORMS": "tpu"})
    monkeypatch.setattr(backend.metadata, "entry_points", lambda group: ["xla_cuda12"])
    assert not backend.runs_on_cpu({})  # an accelerator plugin installed
    monkeypatch.setattr(backend.metadata, "entry_points", lambda group: [])
    assert backend.runs_on_cpu({})


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_kept_on_every_backend_and_xlas_buffers_on_the_cpu(monkeypatch):
    """The heaps are never trimmed (the input pipeline's records); one arena and no mmap only
    where XLA's CPU backend allocates its buffers."""
    calls = []
    monkeypatch.setattr(backend, "_mallopt", lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setenv("XLA_FLAGS", "")
    trim, arenas, mmaps = backend._M_TRIM_THRESHOLD, backend._M_ARENA_MAX, backend._M_MMAP_MAX
    for platforms, expected in (
        ("cuda", {(trim, -1)}),
        ("cpu", {(trim, -1), (arenas, 1), (mmaps, 0)}),
    ):
        calls.clear()
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert backend.prepare_backend() is True
        assert set(calls) == expected and len(calls) == len(expected), (platforms, calls)
    calls.clear()
    assert backend.prepare_backend(malloc=False) is False and not calls


def test_the_compilation_cache_may_be_a_url():
    assert backend.compilation_cache_dir("gs://bucket/xla") == "gs://bucket/xla"
    assert backend.compilation_cache_dir("~/xla") == os.path.join(os.path.expanduser("~"), "xla")
    assert backend.compilation_cache_dir("") is None


def test_the_cpu_flags_are_set_only_where_jax_computes_on_the_cpu(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    backend.prepare_backend(malloc=False)
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_dump_to=/tmp/x" in flags and set(backend.GPU_XLA_FLAGS) <= set(flags)
    assert not set(backend.CPU_XLA_FLAGS) & set(flags)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    backend.prepare_backend(malloc=False)
    assert set(backend.CPU_XLA_FLAGS) <= set(os.environ["XLA_FLAGS"].split())


def test_tensorflow_is_kept_off_the_gpus_by_prepare_backend_not_by_an_import(monkeypatch):
    import tensorflow as tf

    told = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda d, kind: told.append((d, kind)))
    monkeypatch.setenv("XLA_FLAGS", "")
    code = (
        "import tensorflow as tf\n"
        "told = []\n"
        "tf.config.set_visible_devices = lambda *a: told.append(a)\n"
        "import alexnet_jax.train, alexnet_jax.dali_input, alexnet_jax.inference\n"
        "print(told)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert imported.stdout.strip() == "[]"  # importing the data modules hides nothing
    backend.prepare_backend(malloc=False)
    assert told == [([], "GPU")]
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if TensorFlow were not installed
    assert backend.hide_gpus_from_tensorflow() is False and len(told) == 1
