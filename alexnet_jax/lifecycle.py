"""What lets a run be left alone: it stops cleanly when told (SIGTERM, SIGINT), and it holds
its workdir so that no second run can write there.

SIGTERM is what SLURM, Kubernetes and Cloud TPU send before they reclaim a machine. The
handler only sets a flag; the loop finishes its step, saves it and returns. JAX's own
preemption notifier works only with a `jax.distributed` client and listens to SIGTERM only, so
the processes of a run agree on the flag themselves, with a small collective every few steps:
a signal that reaches any one process stops all of them at the same step.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import IO

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from alexnet_jax.errors import UsageError

AGREE_EVERY_STEPS = 10  # multi-process: how often the processes compare their flags


class StopOnSignal:
    """While entered, SIGTERM and SIGINT ask the run to stop after the current step; a second
    SIGINT (Ctrl-C twice) exits at once, saving nothing more."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self._previous: dict[int, object] = {}

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
        """Whether every process stops after `step`: at once in a single process; at the next
        multiple of AGREE_EVERY_STEPS (the same step everywhere) with several."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % AGREE_EVERY_STEPS:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        if flags.any() and self.received is None:
            self.received = f"a signal to process {int(np.flatnonzero(flags)[0])}"
        return bool(flags.any())


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
        if "://" in os.fspath(self.path):
            self._acquire_object()
            return
        f = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
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
        if self.path.exists():
            try:
                holder = json.loads(self.path.read_text())
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
