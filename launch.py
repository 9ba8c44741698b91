"""Train AlexNet: python launch.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...]

Running the same command again resumes from the newest checkpoint in DIR. With --mode=eval
(and --step=N) it evaluates a checkpoint of DIR instead, with the centre crop and ten patches.
"""

import difflib
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow is only the input pipeline
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # configs/ importable from any cwd

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    "~/.cache/alexnet_jax/xla",
    "Persistent XLA compilation cache ('' to disable): restarts skip most compilation. "
    "Only process 0 writes it: on several hosts, give a shared directory or gs://...",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: host:port of process 0 (with the two below)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's index.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "train: train, resuming from DIR's newest checkpoint. eval: evaluate a checkpoint of DIR "
    "(centre crop and ten patches) and change nothing but metrics.jsonl.",
)
_STEP = flags.DEFINE_integer(
    "step", None, "--mode=eval: the checkpoint to evaluate (default: newest)."
)
_ALLOW_CHANGES = flags.DEFINE_bool(
    "allow_config_changes",
    False,
    "Resume a run with other settings (seed, batch, model, optimizer, augmentation) than its "
    "checkpoint's; without it such a resume is refused. Length, cadences, paths and the mesh "
    "may always change.",
)
_ALLOW_CPU = flags.DEFINE_bool(
    "allow_cpu",
    False,
    "Train on the CPU although the host has a GPU or TPU that JAX did not take (without it such "
    "a run stops and names the install of JAX's build for that accelerator).",
)
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
    """jax.distributed from the flags, else from SLURM's srun, Open MPI or a Cloud TPU slice;
    a single process on anything else. Each process drives the devices cluster.py gives it."""
    from alexnet_jax import cluster

    args = cluster.distributed_args(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        os.environ,
        cluster.visible_gpus(os.environ),
        tpu=importlib.util.find_spec("libtpu") is not None,
    )
    cluster.initialize(args)
    logging.info("%s", cluster.describe())  # every process: the first line to read on a cluster


def set_compilation_cache(path: str) -> None:
    """Only process 0 writes JAX's persistent cache: on a per-host directory the other hosts
    never find their programs there, so multi-host runs want a shared or gs:// path."""
    import jax

    from alexnet_jax import backend

    path = backend.compilation_cache_dir(path)
    if path is None:
        return
    if jax.process_count() > 1 and _CACHE.value == _CACHE.default:
        logging.warning(
            "--compilation_cache_dir=%s is per host, and only process 0 writes it: pass a "
            "directory every host shares (or gs://...) so that restarts skip compiling.",
            _CACHE.default,
        )
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _dotted_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, "items"):
            keys += _dotted_keys(v, prefix + k + ".")
    return keys


class ConfigFileError(Exception):
    """A --config file that cannot give a config; the message names the file and the fault."""


def _load_config(path: str):
    """get_config() (or get_config(ARG) for FILE:ARG) of a --config file, before absl parses
    the flags; a ConfigFileError naming the file when that fails."""
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_launch_config", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigFileError(f"--config={file}: line {e.lineno}: {e.msg}") from None
    except Exception as e:
        raise ConfigFileError(f"--config={file} failed to load: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigFileError(
            f"--config={file} defines no get_config(): a config file is a Python module whose "
            "get_config() returns an ml_collections.ConfigDict (see configs/digits.py)."
        )
    call = f"get_config({arg!r})" if arg else "get_config()"
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        raise ConfigFileError(f"--config={path}: {call} raised {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(
            f"--config={path}: {call} returned {type(config).__name__}, not an "
            "ml_collections.ConfigDict (see configs/digits.py)."
        )
    return config


def usage(argv: list[str]) -> str:
    """--help: this docstring, the launch flags, then (with --config=FILE) every config field
    with its value and its comment in FILE (or in the config FILE builds on)."""
    text = f"{__doc__}\nflags:\n{flags.FLAGS.main_module_help()}\n"
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None or not os.path.isfile(path.split(":")[0]):
        return text + "\nWith --config=FILE, --help also lists that config's fields.\n"
    from alexnet_jax import config_doc

    try:
        config = _load_config(path)
    except ConfigFileError as e:
        return f"{text}\n{e}\n"
    fields = config_doc.describe(config, Path(path.split(":")[0]))
    return f"{text}\nConfig fields of {path} (override any with --config.KEY=VALUE):\n{fields}\n"


# Names other codebases give the config's fields, by what they mean: an unknown key whose last
# part is one of these is pointed to the field, before spelling is compared.
MEANT = {
    "total_steps": ("num_train_steps",),
    "train_steps": ("num_train_steps",),
    "max_steps": ("num_train_steps",),
    "steps": ("num_train_steps",),
    "epochs": ("num_epochs",),
    "lr": ("optimizer.learning_rate",),
    "learning_rate": ("optimizer.learning_rate",),
    "base_lr": ("optimizer.learning_rate",),
    "wd": ("optimizer.weight_decay",),
    "weight_decay": ("optimizer.weight_decay",),
    "momentum": ("optimizer.momentum",),
    "warmup_steps": ("optimizer.warmup_steps",),
    "batch": ("batch_size",),
    "global_batch_size": ("batch_size",),
    "dataset": ("input.dataset",),
    "data_dir": ("input.data_dir",),
    "num_classes": ("model.num_classes",),
    "dropout": ("model.dropout_rate",),
    "dtype": ("model.dtype",),
}


def check_overrides(argv: list[str]) -> str | None:
    """One line naming an unknown --config.KEY and its nearest existing key, else None."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None  # absl reports the missing --config itself
    if not os.path.isfile(path.split(":")[0]):
        return f"--config={path}: no such file (the configs are in {HERE / 'configs'})"
    try:
        known = _dotted_keys(_load_config(path))
    except ConfigFileError as e:
        return str(e)
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in known:
                meant = [k for k in MEANT.get(key.rsplit(".", 1)[-1], ()) if k in known]
                near = meant or difflib.get_close_matches(key, known, n=1, cutoff=0.0)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                return f"unknown config key '{key}' in {path}{hint}"
    return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from alexnet_jax import UsageError, backend
    from alexnet_jax.errors import quiet_libraries

    quiet_libraries()

    # Before anything starts a backend: XLA reads its flags once.
    backend.prepare_backend()
    import jax

    from alexnet_jax import cluster, config_checks, lifecycle

    try:
        init_distributed()
        cluster.check_backend(_ALLOW_CPU.value)
        if jax.process_index() > 0:  # one console log is enough; errors still show everywhere
            logging.set_verbosity(logging.WARNING)
        if _MODE.value != "eval":  # (eval checks the config with the checkpoint's model)
            config = config_checks.resolve_batch_size(_CONFIG.value, jax.device_count())
            config_checks.check_config(config, jax.device_count(), jax.process_count())
        set_compilation_cache(_CACHE.value)
        logging.info("config:\n%s", _CONFIG.value)
        from alexnet_jax import evaluation, train  # the input pipeline: TensorFlow starts here

        if _MODE.value == "eval":
            evaluation.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value)
        elif _STEP.value is not None:
            raise UsageError(
                "--step selects the checkpoint of --mode=eval; training resumes from the newest."
            )
        else:
            train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_CHANGES.value)
    except lifecycle.Stopped as e:  # saved and said so: the status tells the scheduler
        lifecycle.exit_within(e.status)
    except UsageError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        lifecycle.exit_within(2)


if __name__ == "__main__":
    if {"--help", "-h", "-?", "--helpshort"} & set(sys.argv[1:]):
        print(usage(sys.argv[1:]), end="")
        sys.exit(0)
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"launch.py: error: {problem}", file=sys.stderr)
        sys.exit(2)
    app.run(main)
