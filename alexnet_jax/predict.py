"""Classify image files with a trained run, from the shell.

    python -m alexnet_jax.predict --workdir=DIR [--step=N] [--top=5] [--json] IMAGE...

Each image (JPEG, PNG, BMP or GIF, any size, greyscale or colour) gets the run's eval
preprocessing (centre crop, its mean and statistics) and its top classes with their
probabilities. A file that is missing or is not an image gets one line naming it; the others
are still classified, and the exit status is then 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def read_image(path: str):
    """uint8 [H, W, 3] of an image file, or a ValueError that says what is wrong with it."""
    import tensorflow as tf

    try:
        data = tf.io.read_file(path)
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.NotFoundError:
        raise ValueError("no such file") from None
    except (tf.errors.InvalidArgumentError, tf.errors.FailedPreconditionError) as e:
        raise ValueError(f"not a readable image ({e.message.splitlines()[0]})") from None
    return image.numpy()


def classify(workdir: str, paths: Sequence[str], top: int, step: int | None = None) -> list[dict]:
    """{'image': path, 'top': [{'class', 'index', 'probability'}, ...]} per path, or
    {'image': path, 'error': why} for a file that could not be read."""
    from alexnet_jax.errors import UsageError
    from alexnet_jax.inference import load_checkpoint

    if top < 1:
        raise UsageError(f"--top={top}: list at least 1 class per image.")
    run = load_checkpoint(workdir, step)
    results = []
    for path in paths:
        try:
            image = read_image(path)
        except ValueError as e:
            results.append({"image": path, "error": str(e)})
            continue
        probs = run.predict(image)[0]
        best = probs.argsort()[::-1][:top]
        results.append(
            {
                "image": path,
                "top": [
                    {"class": run.class_names[i], "index": int(i), "probability": float(probs[i])}
                    for i in best
                ],
            }
        )
    return results


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not FLAGS.workdir or not paths:
        raise app.UsageError("give --workdir=DIR and at least one image file")
    from alexnet_jax.errors import UsageError, quiet_libraries

    quiet_libraries()  # so that the lines about the images are what the console shows

    try:
        results = classify(FLAGS.workdir, paths, FLAGS.top, FLAGS.step)
    except (UsageError, FileNotFoundError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        sys.exit(2)
    for r in results:
        if "error" in r:
            print(f"predict: {r['image']}: {r['error']}", file=sys.stderr)
        if FLAGS.json:
            print(json.dumps(r))
        elif "top" in r:
            print(f"{r['image']}:")
            for t in r["top"]:
                print(f"  {t['probability']:7.2%}  {t['class']}")
    sys.exit(1 if any("error" in r for r in results) else 0)


if __name__ == "__main__":
    # Defined here, not on import: the functions above are also used inside other programs.
    flags.DEFINE_string("workdir", None, "The run's workdir (its checkpoints).")
    flags.DEFINE_integer("step", None, "The checkpoint to use (default: the newest).")
    flags.DEFINE_integer("top", 5, "How many classes to list per image.")
    flags.DEFINE_bool("json", False, "One JSON object per image, one per line.")
    app.run(main)
