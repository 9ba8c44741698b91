"""What lets a run be left alone: it stops cleanly when told (SIGTERM, SIGINT), its workdir is
one directory every process sees, and it holds that workdir so that no second run writes there.

SIGTERM is what SLURM, Kubernetes and Cloud TPU send before they reclaim a machine. The
handler only sets a flag; the loop finishes its step, saves it and raises `Stopped`, whose exit
status (143 for SIGTERM) tells the scheduler the run did not finish. JAX's own
preemption notifier works only with a `jax.distributed` client and listens to SIGTERM only, so
the processes of a run agree on the flag themselves, with a small collective every few steps:
a signal that reaches any one process stops all of them at the same step.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import IO, NoReturn

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from alexnet_jax import paths
from alexnet_jax.errors import UsageError

AGREE_EVERY_STEPS = 10  # multi-process: how often the processes compare their flags
EXIT_GRACE_S = 20.0  # how long a failed process's shutdown may wait for its threads


class Stopped(Exception):
    """The run stopped on a signal before its last step, with that step's checkpoint saved.
    `status` is the exit status that tells a scheduler so: 128 + the signal's number (143 for
    SIGTERM, 130 for SIGINT), and 143 where another process's signal stopped this one."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(f"stopped at step {step} ({signal_name})")
        self.step = step
        known = signal.Signals.__members__.get(signal_name)
        self.status = 128 + int(known if known is not None else signal.SIGTERM)


def exit_within(status: int, grace_s: float | None = None) -> NoReturn:
    """sys.exit(status); if the interpreter's shutdown still waits `grace_s` (EXIT_GRACE_S)
    later (threads of a failed save, or of the distributed client, blocked for good), the
    process ends there with `status`: a failed run must not hold its node until the job's wall
    time."""
    grace_s = EXIT_GRACE_S if grace_s is None else grace_s

    def end() -> None:
        time.sleep(grace_s)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    threading.Thread(target=end, daemon=True, name="exit-watchdog").start()
    sys.exit(status)


class StopOnSignal:
    """While entered, SIGTERM and SIGINT ask the run to stop after the current step; a second
    SIGINT (Ctrl-C twice) exits at once, saving nothing more."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    _instances = itertools.count()  # the same sequence in every process: one key space per run

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self._previous: dict[int, object] = {}
        self._key = f"alexnet_jax/stop/{next(self._instances)}/"
        self._proposed = False

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            print(f"{name} again: exiting now, without saving.", file=sys.stderr, flush=True)
            os._exit(130)
        if self.received is None:
            self.received = name
            print(
                f"{name} received: the run saves a checkpoint at the end of this step and "
                "stops (Ctrl-C again exits at once).",
                file=sys.stderr,
                flush=True,
            )

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step`: at once in a single process. With several,
        a process that received a signal proposes, in JAX's distributed key-value store, to
        stop AGREE_EVERY_STEPS steps after its next multiple of them; every process reads the
        proposals at those multiples, without waiting for the others (no barrier drains the
        devices' queues), and all stop at the earliest. A host runs at most the dispatch depth
        (backend.dispatch_depth, 1-2) steps ahead of another, so each reads every proposal at
        or before the step it names."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % AGREE_EVERY_STEPS:
            return False
        client = distributed_client()
        me = jax.process_index()
        if self.received is not None and not self._proposed:
            client.key_value_set(self._key + str(me), str(step + AGREE_EVERY_STEPS))
            self._proposed = True
        proposals = {
            int(key.rsplit("/", 1)[-1]): int(target)
            for key, target in client.key_value_dir_get(self._key)
        }
        due = sorted(p for p, target in proposals.items() if target <= step)
        if not due:
            return False
        if self.received is None:
            self.received = f"a signal to process {due[0]}"
        return True


def distributed_client():
    """The key-value store of jax.distributed, which the processes of a run share. JAX has no
    public name for it: this is the package's one reach into jax._src, and
    tests/test_lifecycle.py fails by name if JAX moves it."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized: no key-value store to share")
    return client


# ------------------------------------------------------------------------------- the workdir


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """A workdir as a path Orbax, TensorFlow and the metrics can all write: a URL (gs://...)
    stays a URL; a local path is made absolute (Orbax wants one)."""
    text = os.fspath(workdir)
    if paths.is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def writable_dir(directory: epath.Path) -> None:
    """Create `directory` and write a probe file in it, or raise one line saying why not: a
    run checks this before computing anything it would then fail to write."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _probe(directory)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(
            f"--workdir={directory} is a file (or has one in its path), not a directory: choose "
            "another path."
        ) from None
    except OSError as e:
        raise UsageError(
            f"--workdir={directory} cannot be written ({e.strerror or type(e).__name__}): a run "
            "writes its checkpoints and metrics there. Choose a directory you can write, or "
            "fix its permissions."
        ) from None


def _probe(directory: epath.Path) -> None:
    probe = directory / f".write_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    probe.write_text("")
    probe.unlink()


def check_same_workdir(workdir: epath.Path) -> None:
    """Refuse a run whose processes do not share `workdir` (each would write its own part of
    every checkpoint): process 0 writes a token there, and every process must read it."""
    if jax.process_count() == 1:
        return
    token_file = workdir / f".process_check_{jax.process_count()}"
    token = uuid.uuid4().int % 2**31
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        token_file.write_text(str(token))
    token = int(multihost_utils.broadcast_one_to_all(np.int32(token)))
    multihost_utils.sync_global_devices("workdir token written")
    try:
        seen = int(token_file.read_text()) == token
    except (OSError, ValueError):
        seen = False
    seen_by = multihost_utils.process_allgather(np.int32(seen))
    multihost_utils.sync_global_devices("workdir token read")
    if jax.process_index() == 0:
        token_file.unlink(missing_ok=True)
    if not seen_by.all():
        blind = [int(i) for i in np.flatnonzero(seen_by == 0)]
        raise UsageError(
            f"processes {blind} do not see what process 0 wrote in --workdir={workdir}: every "
            "process must use one shared directory (a shared file system or gs://...)."
        )


# --------------------------------------------------------------------------------- the lock


LOCK_NAME = "run.lock"
STALE_AFTER_S = 300  # a URL workdir's lock without a heartbeat this long is taken over
HEARTBEAT_S = 60


def _holder() -> dict:
    return {
        "run": uuid.uuid4().hex[:12],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('since')}"


class WorkdirLock:
    """An exclusive hold on a workdir for one training run.

    A local workdir gets an OS lock (flock) on workdir/run.lock: it dies with the process, so
    a killed run leaves nothing stale behind. A workdir without OS locks (gs://...) gets a
    lock object naming the run, refreshed every minute and taken over only once it is five
    minutes old.
    """

    def __init__(self, workdir: epath.Path):
        self.path = workdir / LOCK_NAME
        self.holder = _holder()
        self._file: IO | None = None
        self._beat: threading.Event | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UsageError naming the run that holds it."""
        if paths.is_url(self.path):
            self._acquire_object()
            return
        f = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # The file system has no flock (Lustre mounted without it: ENOSYS, NFS
                # without its lock daemon: ENOLCK): only "would block" means another run.
                f.close()
                logging.warning(
                    "%s cannot be locked with flock (%s): locking it with a lock object "
                    "instead, as a bucket is",
                    self.path,
                    os.strerror(e.errno) if e.errno else e,
                )
                self._acquire_object()
                return
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            f.close()
            raise self._busy(holder) from None
        f.truncate(0)
        f.write(json.dumps(self.holder))
        f.flush()
        self._file = f

    def _busy(self, holder: dict) -> UsageError:
        return UsageError(
            f"{self.path.parent} is in use by another training run ({_describe(holder)}). Wait "
            "for it to finish, stop it, or use another --workdir; --mode=eval may run beside "
            "it. Nothing was changed."
        )

    def _acquire_object(self) -> None:
        """Take the lock object at self.path, unless another run refreshed it recently."""
        text = self.path.read_text() if self.path.exists() else ""
        if text.strip():  # (an empty file: one that flock could not lock, just created)
            try:
                holder = json.loads(text)
            except ValueError:
                holder = {}
            if time.time() - holder.get("heartbeat", 0) < STALE_AFTER_S:
                raise self._busy(holder)
            logging.warning("taking over the stale lock of %s", _describe(holder))
        self._write_object()
        self._beat = threading.Event()
        threading.Thread(target=self._heartbeat, args=(self._beat,), daemon=True).start()

    def _write_object(self) -> None:
        self.path.write_text(json.dumps({**self.holder, "heartbeat": time.time()}))

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            self._write_object()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._beat is not None:
            self._beat.set()
            self._beat = None
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_workdir(workdir: epath.Path) -> WorkdirLock | None:
    """Process 0 locks `workdir` for the run; all processes raise together if it cannot.
    Returns the lock (None on other processes), to release when the run ends."""
    lock, refused = None, ""
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except UsageError as e:
            lock, refused = None, str(e)
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(not refused))
        if not ok and not refused:
            refused = f"process 0 could not lock {workdir}: another training run holds it."
    if refused:
        raise UsageError(refused)
    return lock
