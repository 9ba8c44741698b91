"""The paper's SGD (section 5) and LARS for large batches, their learning rate set by name, the
base schedules, and the divide-by-10-on-plateau rule, whose state the training loop keeps
outside the optimizer."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from alexnet_jax.errors import UsageError

OPTIMIZERS = ("sgd", "lars")
SCHEDULES = ("plateau", "step", "constant", "poly", "cosine")


def _kernels(params: Any) -> Any:
    """True for the kernels, False for the biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def paper_sgd(
    learning_rate: float, momentum: float, weight_decay: float, decay_biases: bool
) -> optax.GradientTransformation:
    """v <- momentum * v - lr * (g + wd * w); w <- w + v: the rate inside the velocity, as the
    paper writes it (optax.sgd scales after the momentum: the two differ after a rate cut)."""

    def decay_mask(params: Any) -> Any:
        return jax.tree.map(lambda k: decay_biases or k, _kernels(params))

    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale(-learning_rate),
        optax.trace(decay=momentum),
    )


def lars(
    learning_rate: float, momentum: float, weight_decay: float, trust_coefficient: float
) -> optax.GradientTransformation:
    """LARS (You, Gitman and Ginsburg 2017), optax's: each kernel's step is its decayed gradient
    g + wd * w scaled by trust_coefficient * ||w|| / ||g + wd * w||, then by the rate, then
    momentum (the rate inside the velocity, as in `paper_sgd`). Biases get neither the decay
    nor the trust ratio."""
    return optax.lars(
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=_kernels,
        trust_coefficient=trust_coefficient,
        trust_ratio_mask=_kernels,
        momentum=momentum,
    )


def make_optimizer(
    learning_rate: float,
    momentum: float,
    weight_decay: float,
    decay_biases: bool,
    name: str = "sgd",
    trust_coefficient: float = 0.001,
) -> optax.GradientTransformationExtraArgs:
    """`paper_sgd` or `lars` (by `name`) with `learning_rate` in the state's hyperparams (see
    `set_learning_rate`)."""
    if learning_rate <= 0:
        raise UsageError(f"optimizer.learning_rate={learning_rate} must be positive.")
    if name not in OPTIMIZERS:
        raise UsageError(f"optimizer.name={name!r} is unknown; use one of {OPTIMIZERS}.")
    if name == "lars":
        if trust_coefficient <= 0:
            raise UsageError(
                f"optimizer.trust_coefficient={trust_coefficient} must be positive (LARS's "
                "eta; 0.001 in You et al. 2017)."
            )
        if decay_biases:
            raise UsageError(
                "optimizer.decay_biases=True: LARS leaves biases out of the weight decay (and "
                "the trust ratio); set --config.optimizer.decay_biases=False."
            )
        statics = ("momentum", "weight_decay", "trust_coefficient")
        return optax.inject_hyperparams(lars, static_args=statics)(
            learning_rate, momentum, weight_decay, trust_coefficient
        )
    injected = optax.inject_hyperparams(
        paper_sgd, static_args=("momentum", "weight_decay", "decay_biases")
    )
    return injected(learning_rate, momentum, weight_decay, decay_biases)


def set_learning_rate(opt_state: optax.InjectHyperparamsState, lr: jax.Array) -> Any:
    """The state of `make_optimizer` with the rate of its next update set to `lr`."""
    current = opt_state.hyperparams["learning_rate"]
    hyperparams = {**opt_state.hyperparams, "learning_rate": jnp.asarray(lr, current.dtype)}
    return opt_state._replace(hyperparams=hyperparams)


def scaled_learning_rate(learning_rate: float, batch_size: int, base_batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): `learning_rate` is the rate for a global
    batch of `base_batch_size`; a batch k times larger takes k times the rate."""
    if base_batch_size <= 0:
        raise UsageError(
            f"optimizer.base_batch_size={base_batch_size} must be positive: the global batch "
            "that optimizer.learning_rate is meant for (the paper's 128)."
        )
    return learning_rate * batch_size / base_batch_size


def make_schedule(
    schedule: str,
    learning_rate: float,
    step_every_steps: int,
    step_factor: float,
    warmup_steps: int = 0,
    total_steps: int = 1,
) -> optax.Schedule:
    """The base rate per step, ramped up linearly over the first `warmup_steps`; 'plateau'
    multiplies it by the plateau state's scale; 'poly' (power 2, as the LARS papers decay) and
    'cosine' fall to 0 at `total_steps`."""
    if schedule not in SCHEDULES:
        raise UsageError(f"optimizer.schedule={schedule!r} is unknown; use one of {SCHEDULES}.")
    if warmup_steps < 0:
        raise UsageError(f"optimizer.warmup_steps={warmup_steps} must be 0 (none) or positive.")
    if schedule == "step":
        base = optax.exponential_decay(learning_rate, step_every_steps, step_factor, staircase=True)
    elif schedule == "poly":
        base = optax.polynomial_schedule(learning_rate, 0.0, 2, max(total_steps, 1))
    elif schedule == "cosine":
        base = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
    else:
        base = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return base
    return lambda step: base(step) * jnp.minimum(1.0, (step + 1) / warmup_steps)


def make_plateau(
    factor: float, patience: int, min_scale: float
) -> optax.GradientTransformationExtraArgs:
    """reduce_on_plateau, fed only after evaluations: it counts every update towards patience."""
    return optax.contrib.reduce_on_plateau(factor=factor, patience=patience, min_scale=min_scale)


# Fields whose values cannot train, with the range they must lie in: (low, high, whether
# each end is allowed). A momentum of 1 or more never forgets a gradient; a negative decay
# pushes the weights up; a factor above 1 raises the rate.
RANGES = {
    "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, float("inf"), True, False),
    "step_factor": (0.0, 1.0, False, True),
    "step_every_steps": (1, float("inf"), True, False),
    "plateau_factor": (0.0, 1.0, False, False),
    "plateau_patience": (0, float("inf"), True, False),
    "plateau_min_scale": (0.0, 1.0, False, True),
    "trust_coefficient": (0.0, float("inf"), False, False),
}


def check_ranges(o: Mapping[str, Any]) -> None:
    """A UsageError naming the first field of the optimizer section outside its range."""
    for key, (low, high, low_ok, high_ok) in RANGES.items():
        if key not in o:  # a config saved before the field existed
            continue
        v = o[key]
        inside = (low <= v if low_ok else low < v) and (v <= high if high_ok else v < high)
        if not inside:
            ends = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
            ends = ends.replace("inf)", "infinity)")
            raise UsageError(f"optimizer.{key}={v} cannot train: it must lie in {ends}.")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The three pieces of a config's `optimizer` section."""

    tx: optax.GradientTransformationExtraArgs  # the update rule, rate set per step by name
    schedule: optax.Schedule  # the base rate of a step
    plateau: optax.GradientTransformationExtraArgs  # scales the base rate ('plateau' only)

    @classmethod
    def from_config(
        cls,
        o: Mapping[str, Any],
        batch_size: int,
        total_steps: int | None = None,
        steps_per_epoch: float | None = None,
    ) -> Optimizer:
        """`o` is a config's optimizer section; `batch_size` the global batch it trains,
        `total_steps` the run's length ('poly' and 'cosine' decay over it) and
        `steps_per_epoch` its epochs' (for warmup_epochs); None: unknown, for uses that take
        no step."""
        if o["learning_rate"] <= 0:  # named as set, before the batch scaling changes it
            raise UsageError(f"optimizer.learning_rate={o['learning_rate']} must be positive.")
        check_ranges(o)
        lr = scaled_learning_rate(o["learning_rate"], batch_size, o["base_batch_size"])
        # Configs saved before LARS existed meant the paper's SGD.
        name, trust = o.get("name", "sgd"), o.get("trust_coefficient", 0.001)
        warmup, epochs = o["warmup_steps"], o.get("warmup_epochs", 0.0)
        if epochs < 0:
            raise UsageError(f"optimizer.warmup_epochs={epochs} must be 0 (none) or positive.")
        if epochs > 0 and steps_per_epoch is not None:
            warmup = max(round(epochs * steps_per_epoch), 1)
        schedule = make_schedule(
            o["schedule"], lr, o["step_every_steps"], o["step_factor"], warmup, total_steps or 1
        )
        if total_steps is not None and warmup >= total_steps:
            logging.warning(
                "optimizer: the warm-up (%d steps) is at least as long as the run (%d steps): "
                "the rate never reaches optimizer.learning_rate; shorten warmup_steps or "
                "warmup_epochs, or train longer.",
                warmup,
                total_steps,
            )
        return cls(
            make_optimizer(lr, o["momentum"], o["weight_decay"], o["decay_biases"], name, trust),
            schedule,
            make_plateau(o["plateau_factor"], o["plateau_patience"], o["plateau_min_scale"]),
        )
