"""python -m alexnet_jax.figure1: the paper's Figure 1, ReLU against tanh in a small CNN.

    python -m alexnet_jax.figure1 --out=DIR [--dataset=digits | --data_dir=FOLDER |
        --dataset=tfds:cifar10 [--data_dir=TFDS_DIR]]
        [--target=0.25] [--epochs=30] [--seeds=3] [--size=32]

The paper (section 3.1, Figure 1): "A four-layer convolutional neural network with ReLUs (solid
line) reaches a 25% training error rate on CIFAR-10 six times faster than an equivalent network
with tanh neurons (dashed line). The learning rates for each network were chosen independently
to make training as fast as possible. No regularization of any kind was employed." It does not
describe the net further; chosen here: three 5x5/5x5/3x3 convolutions of 32, 32 and 64 channels
(each followed by its nonlinearity, the first two by 2x2 max-pooling) and a fully connected
layer to the classes, on images resized to --size; SGD with momentum 0.9 in batches of 64, no
weight decay, no dropout, no augmentation; the training error of an epoch is the error on its
batches as they are trained, as the paper's curves are. Each nonlinearity gets the learning
rate of --rates that reaches the target in the fewest epochs (ties: the lower rate).

Writes DIR/figure1.png (training error against epochs, mean over seeds: ReLU solid, tanh
dashed) and DIR/figure1.json (every curve, the rates, the epochs each needs to reach the
target, and their ratio).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from alexnet_jax.errors import UsageError

ACTIVATIONS: dict[str, Callable] = {"relu": nn.relu, "tanh": jnp.tanh}


class FourLayerNet(nn.Module):
    """Three convolutions and a fully connected layer, with one nonlinearity throughout."""

    num_classes: int
    activation: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for features, kernel, pool in ((32, 5, True), (32, 5, True), (64, 3, False)):
            x = act(nn.Conv(features, (kernel, kernel))(x))
            if pool:
                x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def load(dataset: str, data_dir: str | None, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The training split as float images in [-1, 1] at size x size, labels, classes: a
    dataset of sources.py, an image folder, or (`tfds:NAME`, e.g. tfds:cifar10, prepared in
    data_dir or TFDS's default directory) any TFDS image classification dataset."""
    import ml_collections
    import tensorflow as tf

    from alexnet_jax import sources

    if dataset.startswith("tfds:"):
        import tensorflow_datasets as tfds

        builder = tfds.builder(dataset[len("tfds:") :], data_dir=data_dir)
        split = builder.as_dataset(split="train", as_supervised=True)
        images, labels = [], []
        for image, label in split.as_numpy_iterator():
            image = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image
            images.append(tf.image.resize(image, [size, size]).numpy() / 127.5 - 1.0)
            labels.append(int(label))
        classes = builder.info.features["label"].num_classes
        return np.stack(images).astype(np.float32), np.array(labels, np.int32), classes

    cfg = ml_collections.ConfigDict(
        {"dataset": dataset, "data_dir": data_dir, "train_split": "train",
         "eval_split": "validation", "manual_dir": None, "shuffle_buffer": 1000,
         "stage_dir": "~/.cache/alexnet_jax/datasets"}
    )  # fmt: skip
    source = sources.create_source(cfg)
    images, labels = [], []
    for key in source.train.epoch(0, 0, 0):
        image, label = source.train.decode(key)
        images.append(tf.image.resize(image, [size, size]).numpy() / 127.5 - 1.0)
        labels.append(int(label))
    return np.stack(images).astype(np.float32), np.array(labels, np.int32), source.num_classes


def train_curve(
    images: np.ndarray,
    labels: np.ndarray,
    classes: int,
    activation: str,
    rate: float,
    epochs: int,
    seed: int,
    batch: int = 64,
) -> list[float]:
    """The training error of each epoch (on its batches, as trained)."""
    model = FourLayerNet(classes, activation)
    key = jax.random.PRNGKey(seed)
    params = model.init(key, images[:1])["params"]
    tx = optax.sgd(rate, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.sum(logits.argmax(-1) != y)

    rng, n = np.random.default_rng(seed), len(labels) // batch * batch
    curve = []
    for _ in range(epochs):
        order = rng.permutation(len(labels))[:n].reshape(-1, batch)
        wrong = 0
        for rows in order:
            params, opt_state, w = step(params, opt_state, images[rows], labels[rows])
            wrong += int(w)
        curve.append(wrong / n)
    return curve


def epochs_to(curve: list[float], target: float) -> int | None:
    """The first epoch (1-based) whose training error is at most `target`."""
    return next((i + 1 for i, e in enumerate(curve) if e <= target), None)


def figure1(
    images: np.ndarray,
    labels: np.ndarray,
    classes: int,
    target: float,
    epochs: int,
    seeds: int,
    rates: list[float],
) -> dict:
    """Both nonlinearities at their fastest rate, over seeds: curves, epochs, the ratio."""
    out: dict = {"target": target, "epochs": epochs, "seeds": seeds, "activations": {}}
    for activation in ACTIVATIONS:
        best = None
        for rate in rates:  # the fastest rate on seed 0, as the paper chose one per network
            reached = epochs_to(train_curve(images, labels, classes, activation, rate, epochs, 0),
                                target)  # fmt: skip
            if reached is not None and (best is None or reached < best[1]):
                best = (rate, reached)
        rate = best[0] if best else rates[0]
        curves = [
            train_curve(images, labels, classes, activation, rate, epochs, s) for s in range(seeds)
        ]
        reached = [epochs_to(c, target) for c in curves]
        done = [r for r in reached if r is not None]
        out["activations"][activation] = {
            "rate": rate,
            "curves": curves,
            "epochs_to_target": reached,
            "mean_epochs_to_target": float(np.mean(done)) if len(done) == seeds else None,
        }
    relu, tanh = (out["activations"][a]["mean_epochs_to_target"] for a in ("relu", "tanh"))
    out["tanh_over_relu"] = tanh / relu if relu and tanh else None
    return out


def plot(result: dict, path: Path) -> bool:
    """The mean curves (ReLU solid, tanh dashed), if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for activation, style in (("relu", "-"), ("tanh", "--")):
        curves = result["activations"][activation]["curves"]
        length = min(len(c) for c in curves)
        mean = np.mean([c[:length] for c in curves], axis=0)
        ax.plot(range(1, length + 1), mean, style, color="k", label=activation)
    ax.axhline(result["target"], color="grey", lw=0.5)
    ax.set_xlabel("epochs")
    ax.set_ylabel("training error rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str]) -> None:
    del argv
    from alexnet_jax import backend
    from alexnet_jax.errors import quiet_libraries

    quiet_libraries()
    backend.prepare_backend()
    out = Path(_OUT.value).expanduser()
    try:
        if not 0 < _TARGET.value < 1 or _EPOCHS.value < 1 or _SEEDS.value < 1:
            raise UsageError("--target in (0, 1), --epochs and --seeds at least 1.")
        folder = _DATA_DIR.value and not _DATASET.value.startswith("tfds:")
        dataset = "imagefolder" if folder else _DATASET.value
        images, labels, classes = load(dataset, _DATA_DIR.value, _SIZE.value)
        rates = [float(r) for r in _RATES.value]
        result = figure1(images, labels, classes, _TARGET.value, _EPOCHS.value, _SEEDS.value,
                         rates)  # fmt: skip
    except UsageError as e:
        sys.exit(f"figure1: error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "figure1.json").write_text(json.dumps({"dataset": dataset, **result}, indent=1))
    if not plot(result, out / "figure1.png"):
        print('figure1.png not drawn: matplotlib is not installed (pip install -e ".[notebooks]")')
    for activation, r in result["activations"].items():
        print(f"{activation}: rate {r['rate']}, epochs to {result['target']:.0%} training error: "
              f"{r['epochs_to_target']}")  # fmt: skip
    ratio = result["tanh_over_relu"]
    print(f"tanh needs {ratio:.1f}x the epochs of ReLU" if ratio else "a net missed the target")


if __name__ == "__main__":
    _OUT = flags.DEFINE_string("out", None, "Where figure1.png and figure1.json go.")
    _DATASET = flags.DEFINE_string(
        "dataset", "digits", "A dataset of sources.py, or tfds:NAME (e.g. tfds:cifar10)."
    )
    _DATA_DIR = flags.DEFINE_string(
        "data_dir", None, "An image folder (DIR/train/<class>/), or TFDS's data_dir for tfds:."
    )
    _TARGET = flags.DEFINE_float("target", 0.25, "The training error to reach.")
    _EPOCHS = flags.DEFINE_integer("epochs", 30, "Epochs per run.")
    _SEEDS = flags.DEFINE_integer("seeds", 3, "Runs per nonlinearity.")
    _SIZE = flags.DEFINE_integer("size", 32, "Image side (CIFAR-10's: 32).")
    _RATES = flags.DEFINE_list("rates", ["0.003", "0.01", "0.03", "0.1"], "Rates to choose from.")
    flags.mark_flags_as_required(["out"])
    app.run(main)
