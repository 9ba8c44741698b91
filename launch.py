"""Train AlexNet: python launch.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...]

Running the same command again resumes from the newest checkpoint in DIR.
"""

import difflib
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow is only the input pipeline
sys.path.insert(0, str(Path(__file__).resolve().parent))  # configs/ importable from any cwd

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    "~/.cache/alexnet_jax/xla",
    "Persistent XLA compilation cache ('' to disable): restarts skip most compilation.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: host:port of process 0 (with the two below)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's index.")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
    """jax.distributed: explicit flags, else auto-detected on SLURM (several tasks) and Cloud
    TPU VMs; a single process on anything else."""
    import jax

    given = {
        "--coordinator_address": _COORDINATOR.value,
        "--num_processes": _NUM_PROCESSES.value,
        "--process_id": _PROCESS_ID.value,
    }
    missing = [k for k, v in given.items() if v is None]
    if len(missing) < 3:
        if missing:
            set_ = [k for k in given if k not in missing]
            from alexnet_jax import UsageError

            raise UsageError(
                f"{', '.join(set_)} given without {', '.join(missing)}: a multi-process run "
                "needs all three (or none, on SLURM and Cloud TPU, where JAX finds them)."
            )
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or importlib.util.find_spec("libtpu"):
        jax.distributed.initialize()


def _dotted_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, "items"):
            keys += _dotted_keys(v, prefix + k + ".")
    return keys


def check_overrides(argv: list[str]) -> str | None:
    """One line naming an unknown --config.KEY and its nearest existing key, else None."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None or not os.path.exists(path.split(":")[0]):
        return None  # absl reports the missing or wrong --config itself
    spec = importlib.util.spec_from_file_location("_launch_config", path.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    known = _dotted_keys(module.get_config())
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                return f"unknown config key '{key}' in {path}{hint}"
    return None


class _QuietLibraries:
    """Drop INFO records of Orbax (a dozen per checkpoint) from the console; keep warnings."""

    def filter(self, record) -> bool:
        return record.levelno > 20 or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    from alexnet_jax import UsageError, train

    try:
        init_distributed()
        if jax.process_index() > 0:  # one console log is enough; errors still show everywhere
            logging.set_verbosity(logging.WARNING)
        if _CACHE.value:
            jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        logging.info("config:\n%s", _CONFIG.value)
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except UsageError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"launch.py: error: {problem}", file=sys.stderr)
        sys.exit(2)
    app.run(main)
