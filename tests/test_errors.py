"""errors.py: the user's mistakes as one type, and a console without the libraries' chatter."""

import logging
import sys
import types

from absl import logging as absl_logging

from alexnet_jax import UsageError, errors


def test_a_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)


def _record(path: str, level: int, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("x", level, path, 1, "message", None, exc_info)


def test_orbax_info_and_exception_records_are_dropped_and_the_rest_kept():
    quiet = errors._QuietLibraries()
    orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    ours = "/repo/alexnet_jax/checkpoint.py"
    try:
        raise OSError("disk full")
    except OSError:
        failure = sys.exc_info()
    assert not quiet.filter(_record(orbax, logging.INFO))
    assert not quiet.filter(_record(orbax, logging.ERROR, failure))  # checkpoint.py names it
    assert quiet.filter(_record(orbax, logging.WARNING))
    assert quiet.filter(_record(ours, logging.INFO))
    assert quiet.filter(_record(ours, logging.ERROR, failure))


def test_quiet_libraries_drops_only_the_orphaned_callbacks_of_a_failed_save(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    handler = absl_logging.get_absl_handler()
    monkeypatch.setattr(handler, "filters", list(handler.filters))
    errors.quiet_libraries()
    assert any(isinstance(f, errors._QuietLibraries) for f in handler.filters)
    orphan, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
    for exc in (orphan, other):
        sys.unraisablehook(types.SimpleNamespace(exc_value=exc))
    assert seen == [other]
