"""A run left alone: SIGTERM/SIGINT stop it with a checkpoint, one run per workdir, a save cut
short by SIGKILL costs only that save; workdirs that are URLs, and processes that do not share
theirs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from conftest import CACHE, REPO, tiny_config, tiny_flags
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing
from test_launch import launch, metrics

from alexnet_jax import UsageError, evaluation, lifecycle, load_checkpoint, train


def test_a_second_run_on_a_workdir_is_refused_naming_the_first(tmp_path):
    from etils import epath

    first = lifecycle.WorkdirLock(epath.Path(tmp_path))
    first.acquire()
    holder = json.loads((tmp_path / "run.lock").read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(UsageError, match=rf"in use by another training run \(pid {os.getpid()} on"):
        lifecycle.WorkdirLock(epath.Path(tmp_path)).acquire()
    assert json.loads((tmp_path / "run.lock").read_text()) == holder  # untouched
    first.release()
    with lifecycle.WorkdirLock(epath.Path(tmp_path)):  # free again once released
        pass


def test_a_workdir_that_is_a_file_is_one_line_and_stays_as_it_was(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("kept")
    for workdir in (path, path / "run"):
        with pytest.raises(UsageError, match=r"notes.txt(/run)? is a file \(or has one in its"):
            train.train_and_evaluate(tiny_config(), str(workdir))
    assert path.read_text() == "kept"


def _unwritable(monkeypatch) -> None:
    """Writes to a workdir fail as on a read-only mount (root, running the tests in CI, may
    write through file permissions)."""

    def probe(directory):
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(lifecycle, "_probe", probe)


def test_a_read_only_workdir_is_one_line_before_any_work(tmp_path, monkeypatch, trained_on_4x2):
    _unwritable(monkeypatch)
    with pytest.raises(UsageError, match=r"cannot be written \(Permission denied\)"):
        train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no lock, no checkpoints
    # --mode=eval on a read-only workdir stops before evaluating, not after.
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    config, workdir = trained_on_4x2
    with pytest.raises(UsageError, match=r"eval_mode cannot be written \(Permission denied\)"):
        evaluation.evaluate_checkpoint(config, str(workdir))


def test_a_workdir_without_os_locks_holds_a_lock_object_with_a_heartbeat(tmp_path, monkeypatch):
    from etils import epath
    from etils.epath import gpath

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # etils' own gs:// backend
    lock_file = tmp_path / "bucket" / "run" / "run.lock"
    lock_file.parent.mkdir(parents=True)
    with epath.testing.mock_epath(**_redirect(tmp_path)):
        workdir = epath.Path("gs://bucket/run")
        with lifecycle.WorkdirLock(workdir):
            held = json.loads(lock_file.read_text())
            assert time.time() - held["heartbeat"] < 60 and held["pid"] == os.getpid()
            with pytest.raises(UsageError, match="in use by another training run"):
                lifecycle.WorkdirLock(workdir).acquire()
        assert not lock_file.exists()  # released
        stale = {**held, "heartbeat": time.time() - lifecycle.STALE_AFTER_S - 1}
        lock_file.write_text(json.dumps(stale))
        with lifecycle.WorkdirLock(workdir) as taken:  # a dead run's lock is taken over
            assert json.loads(lock_file.read_text())["run"] == taken.holder["run"] != held["run"]


@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK"])
def test_a_file_system_without_flock_gets_the_lock_object(tmp_path, monkeypatch, code):
    import errno
    import fcntl

    from etils import epath

    def no_flock(f, how):
        if how != fcntl.LOCK_UN:
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(lifecycle.fcntl, "flock", no_flock)  # Lustre mounted without flock
    workdir = epath.Path(tmp_path)
    with lifecycle.WorkdirLock(workdir):  # not "in use by another training run"
        held = json.loads((tmp_path / "run.lock").read_text())
        assert time.time() - held["heartbeat"] < 60 and held["pid"] == os.getpid()
        with pytest.raises(UsageError, match="in use by another training run"):
            lifecycle.WorkdirLock(workdir).acquire()
    assert not (tmp_path / "run.lock").exists()  # released
    # "Would block" still means another run holds it.
    blocked = lambda f, how: (_ for _ in ()).throw(BlockingIOError(errno.EWOULDBLOCK, "busy"))
    monkeypatch.setattr(lifecycle.fcntl, "flock", blocked)
    with pytest.raises(UsageError, match="in use by another training run"):
        lifecycle.WorkdirLock(workdir).acquire()


def test_a_signal_asks_for_a_stop_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with lifecycle.StopOnSignal() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # Python runs the handler between bytecodes
        assert stop.received == "SIGTERM" and stop.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_processes_agree_on_the_stop_through_the_key_value_store_not_a_barrier(monkeypatch):
    store: dict[str, str] = {}

    class Client:  # jax.distributed's key-value store, in memory
        def key_value_set(self, key, value):
            store[key] = value

        def key_value_dir_get(self, prefix):
            return [(k, v) for k, v in store.items() if k.startswith(prefix)]

    def barrier(*_):
        raise AssertionError("the stop check waited for every process")

    me = {"index": 0}
    monkeypatch.setattr(lifecycle, "distributed_client", Client)
    monkeypatch.setattr(lifecycle.multihost_utils, "process_allgather", barrier)
    monkeypatch.setattr(lifecycle.jax, "process_count", lambda: 2)
    monkeypatch.setattr(lifecycle.jax, "process_index", lambda: me["index"])
    first, second = lifecycle.StopOnSignal(), lifecycle.StopOnSignal()
    second._key = first._key  # the same run, seen from two processes
    second.received = "SIGTERM"  # process 1's signal, noticed at its step 10
    me["index"] = 1
    assert not second.should_stop(10) and store == {first._key + "1": "20"}
    me["index"] = 0
    assert not first.should_stop(10) and not first.should_stop(15)
    assert first.should_stop(20) and first.received == "a signal to process 1"
    me["index"] = 1
    assert second.should_stop(20) and second.received == "SIGTERM"


def test_the_key_value_store_is_where_jax_keeps_it(monkeypatch):
    """The package's one private JAX name (lifecycle.distributed_client): this fails by name
    when a JAX release moves jax.distributed's client, before a multi-process run would."""
    from jax._src import distributed

    assert hasattr(distributed, "global_state") and hasattr(distributed.global_state, "client")
    with pytest.raises(RuntimeError, match="jax.distributed is not initialized"):
        lifecycle.distributed_client()  # one process here: no client
    client = object()
    monkeypatch.setattr(distributed.global_state, "client", client)
    assert lifecycle.distributed_client() is client


def test_a_second_ctrl_c_exits_at_once():
    script = textwrap.dedent(
        """
        import os, signal, time
        from alexnet_jax import lifecycle
        with lifecycle.StopOnSignal():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        """
    )
    start = time.time()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 130 and time.time() - start < 25
    assert "SIGINT received" in r.stderr and "SIGINT again: exiting now" in r.stderr


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)


@pytest.mark.slow  # two launches
def test_sigterm_saves_the_step_reached_and_the_run_resumes_from_it(tmp_path):
    args = tiny_flags(
        num_train_steps=400, checkpoint_every_steps=200, eval_every_steps=200, log_every_steps=5
    )
    proc = launch(tmp_path, *args, wait=False)
    _wait_for(tmp_path / "metrics.jsonl", proc)  # training, past step 5
    proc.send_signal(signal.SIGTERM)
    start = time.time()
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 143, out[-3000:]  # not finished: a scheduler restarts it
    assert time.time() - start < 30
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 5 <= saved[0] < 200  # the step reached, not a periodic save
    assert f"stopped at step {saved[0]} of 400 (SIGTERM)" in out and "Traceback" not in out

    r = launch(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from the checkpoint at step {saved[0]}" in r.stderr
    assert load_checkpoint(str(tmp_path)).step == 400


@pytest.mark.slow  # two launches
def test_a_second_run_stops_at_once_and_the_first_finishes(tmp_path):
    args = tiny_flags(num_train_steps=150, checkpoint_every_steps=50, log_every_steps=5)
    first = launch(tmp_path, *args, wait=False)
    _wait_for(tmp_path / "metrics.jsonl", first)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    start = time.time()
    second = launch(tmp_path, *args)
    assert second.returncode == 2 and time.time() - start < 60
    lines = second.stderr.strip().splitlines()
    assert (
        lines[-1].startswith("launch.py: error: ") and "in use by another training run" in lines[-1]
    )
    assert f"(pid {first.pid} on" in lines[-1] and "Traceback" not in second.stderr
    assert set(before) <= {p.name for p in tmp_path.rglob("*")}  # nothing removed
    out = first.communicate(timeout=600)[0].decode()
    assert first.returncode == 0, out[-3000:]
    assert load_checkpoint(str(tmp_path)).step == 150


KILL_DURING_SAVE = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity

def killing(finalize):
    async def wrapped(self, *args, **kwargs):
        if self.get().name.startswith("{step}."):  # files written, not yet committed
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self, *args, **kwargs)
    return wrapped

for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    cls.finalize = killing(cls.finalize)
sys.argv = {argv}
runpy.run_path({launch!r}, run_name="__main__")
"""


@pytest.mark.slow  # three launches
def test_a_run_killed_while_saving_restarts_from_the_newest_complete_checkpoint(tmp_path):
    args = tiny_flags(num_train_steps=12, checkpoint_every_steps=4, log_every_steps=4)
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    argv = ["launch.py", "--config=configs/digits.py", f"--workdir={broken}", *args]
    script = KILL_DURING_SAVE.format(step=8, argv=argv, launch=str(REPO / "launch.py"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    partial = [p.name for p in (broken / "checkpoints").iterdir() if "tmp" in p.name]
    assert partial and partial[0].startswith("8.")  # killed inside the save of step 8
    assert (broken / "checkpoints" / "4").is_dir() and not (broken / "checkpoints" / "8").exists()

    r = launch(broken, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "removing incomplete checkpoints of a killed run" in r.stderr
    assert "resumed from the checkpoint at step 4" in r.stderr
    assert not [p for p in (broken / "checkpoints").iterdir() if "tmp" in p.name]
    assert launch(whole, *args).returncode == 0
    a, b = load_checkpoint(str(broken)), load_checkpoint(str(whole))
    assert a.step == b.step == 12
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    assert [m["step"] for m in metrics(broken)] == [m["step"] for m in metrics(whole)]


# --------------------------------------------------------------------------------- workdirs


def test_workdir_urls_stay_urls():
    assert os.fspath(lifecycle.workdir_path("gs://bucket/run") / "checkpoints") == (
        "gs://bucket/run/checkpoints"
    )
    home = os.path.expanduser("~")
    assert os.fspath(lifecycle.workdir_path("~/run")) == os.path.join(home, "run")
    assert os.path.isabs(lifecycle.workdir_path("relative/run"))


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
    import tensorflow as tf

    from alexnet_jax import checkpoint

    seen = {}
    real_manager, real_tb = checkpoint.ocp.CheckpointManager, tf.summary.create_file_writer

    def manager(directory, **kw):
        seen["orbax"] = os.fspath(directory)
        return real_manager(os.fspath(directory).replace("gs://", f"{tmp_path}/"), **kw)

    def tb(logdir, *a, **kw):
        seen["tensorboard"] = logdir
        return real_tb(logdir.replace("gs://", f"{tmp_path}/"), *a, **kw)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", manager)
    monkeypatch.setattr(tf.summary, "create_file_writer", tb)
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


def test_exit_within_ends_a_process_whose_threads_never_end():
    code = textwrap.dedent(
        """
        import threading, time
        from alexnet_jax import lifecycle
        threading.Thread(target=threading.Event().wait, daemon=False).start()
        lifecycle.exit_within(3, grace_s=0.5)
        """
    )
    start = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr[-2000:]
    assert time.time() - start < 30


# launch.py with a thread that never ends, as Orbax's threads could after a failed save, and
# a shorter grace period; argv[1] chooses how the save fails.
FAILED_SAVE = """
import os, runpy, shutil, sys, threading
from alexnet_jax import checkpoint, lifecycle

lifecycle.EXIT_GRACE_S = 3.0
threading.Thread(target=threading.Event().wait, daemon=False, name="blocked").start()
how = sys.argv.pop(1)
if how == "file":  # checkpoints/ replaced by a file once the run is under way
    save = checkpoint.Checkpointer.save

    def replaced(self, *args, **kwargs):
        shutil.rmtree(self.directory)
        self.directory.write_text("not a directory")
        return save(self, *args, **kwargs)

    checkpoint.Checkpointer.save = replaced
sys.argv[0] = os.path.join(os.getcwd(), "launch.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # two short runs
@pytest.mark.parametrize("how", ["long", "file"])
def test_a_failed_save_exits_with_its_line_even_if_a_thread_hangs(tmp_path, how):
    workdir = tmp_path / "run"
    if how == "long":  # a workdir whose checkpoints' paths pass the file system's limit
        workdir = tmp_path
        while len(str(workdir)) < 3990:
            workdir = workdir / ("d" * min(200, 3990 - len(str(workdir)) - 1))
    args = [f"--config={REPO / 'configs/digits.py'}", f"--workdir={workdir}"]
    args += tiny_flags(num_train_steps=8, checkpoint_every_steps=4)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    start = time.time()
    r = subprocess.run(
        [sys.executable, "-c", FAILED_SAVE, how, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("launch.py: error: Saving the checkpoint of step 4 in "), last
    assert "The newest intact checkpoint is none" in last and "Traceback" not in r.stderr
    assert time.time() - start < 120
