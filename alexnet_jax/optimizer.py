"""The paper's SGD (section 5) with its learning rate set by name, the base schedules, and the
divide-by-10-on-plateau rule, whose state the training loop keeps outside the optimizer."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from alexnet_jax.errors import UsageError

SCHEDULES = ("plateau", "step", "constant")


def paper_sgd(
    learning_rate: float, momentum: float, weight_decay: float, decay_biases: bool
) -> optax.GradientTransformation:
    """v <- momentum * v - lr * (g + wd * w); w <- w + v: the rate inside the velocity, as the
    paper writes it (optax.sgd scales after the momentum: the two differ after a rate cut)."""

    def decay_mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: decay_biases or path[-1].key == "kernel", params
        )

    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale(-learning_rate),
        optax.trace(decay=momentum),
    )


def make_optimizer(
    learning_rate: float, momentum: float, weight_decay: float, decay_biases: bool
) -> optax.GradientTransformationExtraArgs:
    """`paper_sgd` with `learning_rate` in the state's hyperparams (see `set_learning_rate`)."""
    if learning_rate <= 0:
        raise UsageError(f"optimizer.learning_rate={learning_rate} must be positive.")
    injected = optax.inject_hyperparams(
        paper_sgd, static_args=("momentum", "weight_decay", "decay_biases")
    )
    return injected(learning_rate, momentum, weight_decay, decay_biases)


def set_learning_rate(opt_state: optax.InjectHyperparamsState, lr: jax.Array) -> Any:
    """The state of `make_optimizer` with the rate of its next update set to `lr`."""
    current = opt_state.hyperparams["learning_rate"]
    hyperparams = {**opt_state.hyperparams, "learning_rate": jnp.asarray(lr, current.dtype)}
    return opt_state._replace(hyperparams=hyperparams)


def make_schedule(
    schedule: str, learning_rate: float, step_every_steps: int, step_factor: float
) -> optax.Schedule:
    """The base rate per step; 'plateau' multiplies it by the plateau state's scale."""
    if schedule not in SCHEDULES:
        raise UsageError(f"optimizer.schedule={schedule!r} is unknown; use one of {SCHEDULES}.")
    if schedule == "step":
        return optax.exponential_decay(learning_rate, step_every_steps, step_factor, staircase=True)
    return optax.constant_schedule(learning_rate)


def make_plateau(
    factor: float, patience: int, min_scale: float
) -> optax.GradientTransformationExtraArgs:
    """reduce_on_plateau, fed only after evaluations: it counts every update towards patience."""
    return optax.contrib.reduce_on_plateau(factor=factor, patience=patience, min_scale=min_scale)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The three pieces of a config's `optimizer` section."""

    tx: optax.GradientTransformationExtraArgs  # the update rule, rate set per step by name
    schedule: optax.Schedule  # the base rate of a step
    plateau: optax.GradientTransformationExtraArgs  # scales the base rate ('plateau' only)

    @classmethod
    def from_config(cls, o: Mapping[str, Any]) -> Optimizer:
        return cls(
            make_optimizer(o["learning_rate"], o["momentum"], o["weight_decay"], o["decay_biases"]),
            make_schedule(
                o["schedule"], o["learning_rate"], o["step_every_steps"], o["step_factor"]
            ),
            make_plateau(o["plateau_factor"], o["plateau_patience"], o["plateau_min_scale"]),
        )
