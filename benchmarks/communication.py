"""Print the collectives and per-device memory of the compiled train step for a config and mesh.

    python benchmarks/communication.py --config=configs/alexnet.py \
        --config.mesh.data=1 --config.mesh.model=2 [--devices=8]

On a CPU-only machine the devices are simulated (--devices, default data*model). Nothing is
allocated: the step is compiled from abstract shapes. See benchmarks/report.py for how bytes
and the memory peak are counted.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
_DEVICES = flags.DEFINE_integer("devices", None, "Simulated CPU devices (default: the mesh's).")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    import jax

    # Only the CPU backend reads this: on GPU/TPU the real devices are used.
    wanted = _DEVICES.value or max(config.mesh.data, 1) * config.mesh.model
    jax.config.update("jax_num_cpu_devices", wanted)
    from alexnet_jax import config_checks, parallel
    from benchmarks import report

    config_checks.check_config(config, jax.device_count(), 1)
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.model)
    print(report.report(config, mesh)[0])


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
