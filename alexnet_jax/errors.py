"""What a user sees when something is wrong: the one exception type for mistakes a user can
fix (config, data, workdir), and a console without the libraries' routine chatter."""

import sys

from absl import logging


class UsageError(ValueError):
    """A problem in the config, the data or the workdir; the message says how to fix it.

    launch.py prints these as one message without a traceback; anything else is a bug.
    """


class _QuietLibraries:
    """Drops Orbax's INFO records (a dozen per checkpoint read or written) and its records of
    exceptions: each reaches checkpoint.py, which names it in one line (a failed save or a
    damaged checkpoint). Keeps Orbax's other warnings. Drops JAX's INFO lines about backends
    it did not find."""

    def filter(self, record) -> bool:
        if record.pathname.endswith("xla_bridge.py") and record.levelno <= 20:
            # "Unable to initialize backend 'tpu'" and the like on every host without that
            # backend: cluster.check_backend names a backend that should have started.
            return False
        if "/orbax/" not in record.pathname:
            return True
        return record.levelno > 20 and not record.exc_info


def _orphan_callback(exc: BaseException) -> bool:
    """TensorStore's write callbacks that find Orbax's event loop already closed after a
    failed save (each prints a traceback, and changes nothing)."""
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def quiet_libraries() -> None:
    """Keep Orbax's INFO lines, and the tracebacks of a failed save's orphaned callbacks, off
    the console, so that ours (and the errors they explain) stand out."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    previous = sys.unraisablehook  # TensorStore reports them as unraisable

    def unraisablehook(unraisable) -> None:
        if not _orphan_callback(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = unraisablehook
