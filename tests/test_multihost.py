"""Several processes on 127.0.0.1 (simulated CPU devices) train like one process with 4."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import CACHE, REPO, tiny_flags

ARGS = tiny_flags(
    num_train_steps=4,
    log_every_steps=1,
    eval_every_steps=4,
    checkpoint_every_steps=4,
    **{"mesh.model": 2},
)


def _cmd(workdir, *extra):
    return [
        sys.executable,
        str(REPO / "launch.py"),
        f"--config={REPO / 'configs/digits.py'}",
        f"--workdir={workdir}",
        f"--compilation_cache_dir={CACHE}",
        *ARGS,
        *extra,
    ]


def _env(devices):
    return dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


def _losses(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}, lines[-1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process with four devices."""
    workdir = tmp_path_factory.mktemp("single")
    r = subprocess.run(_cmd(workdir), env=_env(4), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return _losses(workdir)


def _run_processes(workdir, n, devices_each):
    addr = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            _cmd(
                workdir,
                f"--coordinator_address={addr}",
                f"--num_processes={n}",
                f"--process_id={i}",
            ),
            env=_env(devices_each),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    return outs


# (2, 2) keeps each tower pair inside one process; (4, 1) splits every pair over two processes,
# each of which then reads and decodes half of the pair's rows.
@pytest.mark.slow  # end-to-end runs of several processes, like the demos
@pytest.mark.parametrize("n, devices_each", [(2, 2), (4, 1)])
def test_processes_match_one(tmp_path, single, n, devices_each):
    outs = _run_processes(tmp_path, n, devices_each)
    (a, a_eval), (b, b_eval) = _losses(tmp_path), single
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert len(set(b.values())) == 4  # the loss moves: the comparison can fail
    for step in b:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(b[step]), (step, a[step], b[step])
    assert a_eval["eval/count"] == b_eval["eval/count"] == 360
    assert (tmp_path / "checkpoints" / "4").is_dir()  # written by every process through Orbax
    assert "mesh {'data': 2, 'model': 2} on 4 devices" in outs[0]
    # Of each global batch of 16, a process reads its pair's 8 rows, or half of them.
    assert f"16, of which this process reads {16 // 2 // (2 // devices_each)}" in outs[0]
    for i, out in enumerate(outs):  # every process says what it drives
        assert f"process {i} of {n}: {devices_each} local cpu device(s)" in out
        assert "device(s) [" in out and "] (cpu), 4 in all" in out  # ids, kind, count


def test_a_multihost_flag_alone_is_refused(tmp_path):
    r = subprocess.run(
        _cmd(tmp_path, "--num_processes=2"),
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    assert "--num_processes given without --coordinator_address, --process_id" in r.stderr


@pytest.mark.slow  # two processes, a few hundred steps at most
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """A signal reaching process 1 only: both processes save the same step and exit 0."""
    import signal
    import time

    args = tiny_flags(
        num_train_steps=400,
        log_every_steps=5,
        eval_every_steps=200,
        checkpoint_every_steps=200,
        **{"mesh.model": 2},
    )
    addr = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                *_cmd(tmp_path)[: -len(ARGS)],
                *args,
                f"--coordinator_address={addr}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").exists():  # both are training
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], "\n".join(o[-2000:] for o in outs)
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] % 10 == 0 and 0 < saved[0] < 200, saved
    step = saved[0]
    assert f"stopped at step {step} of 400 (SIGTERM)" in outs[1]
    assert f"stopped at step {step} of 400 (a signal to process 1)" in outs[0]
