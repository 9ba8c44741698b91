"""Prepare ImageNet 2012 once, from the two manual-download tars, as array_record files
(random access: each process reads only its own examples, and a resumed run seeks directly).

    python -m alexnet_jax.prepare_imagenet --data_dir=~/tensorflow_datasets \
        --manual_dir=~/imagenet_tars [--form=paper256]

--form=tfds (the default) runs TFDS's imagenet2012 builder: full-size images, one process
(the `tfds build` command line would do the same but needs Apache Beam installed).
--form=paper256 stores every image as the paper did, 256x256, on every core (paper256.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags

from alexnet_jax.errors import UsageError
from alexnet_jax.sources import IMAGENET_TARS

_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir to fill.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Directory holding the two ILSVRC tars.")
_FORM = flags.DEFINE_enum(
    "form", "tfds", ["tfds", "paper256"], "tfds: TFDS imagenet2012; paper256: 256x256 JPEGs."
)
_PROCESSES = flags.DEFINE_integer("processes", None, "paper256: worker processes (all cores).")


def prepare(
    data_dir: str, manual_dir: str, form: str = "tfds", processes: int | None = None
) -> Path:
    """Convert the tars (about 150 GB) into data_dir/imagenet2012 (hours on one machine) or,
    for form 'paper256', data_dir/imagenet2012_paper256 (on every core)."""
    import tensorflow_datasets as tfds

    manual = Path(manual_dir).expanduser()
    missing = [t for t in IMAGENET_TARS if not (manual / t).is_file()]
    if missing:
        raise UsageError(
            f"{manual} lacks {' and '.join(missing)}: download them from https://image-net.org "
            "(a login is needed) and put them there, unextracted."
        )
    if form == "paper256":
        from alexnet_jax import paper256

        return paper256.prepare(data_dir, str(manual), processes)
    data_dir = os.path.expanduser(data_dir)
    builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return Path(data_dir) / "imagenet2012"


def main(argv: list[str]) -> None:
    del argv
    if not _MANUAL_DIR.value:
        sys.exit(
            "prepare_imagenet: error: --manual_dir=DIR (the directory with the tars) is needed"
        )
    from alexnet_jax.paper256 import Stopped

    try:
        path = prepare(_DATA_DIR.value, _MANUAL_DIR.value, _FORM.value, _PROCESSES.value)
        print(f"prepared {path}")
    except UsageError as e:
        sys.exit(f"prepare_imagenet: error: {e}")
    except Stopped as e:  # paper256: the finished shards are kept
        print(f"prepare_imagenet: {e.args[1] if len(e.args) > 1 else e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:  # tfds: TFDS's builder starts again next time
        print("prepare_imagenet: stopped (SIGINT).", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main)
