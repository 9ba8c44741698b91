"""The jitted pieces of a run, built once for a config and a mesh: the train state, its
sharded initialisation, the train step (normalise, model, loss, update), the eval steps and
the plateau rule's update."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alexnet_jax import backend, device_input, parallel
from alexnet_jax.batch import Batch
from alexnet_jax.metrics import Accumulator, means
from alexnet_jax.model import AlexNet
from alexnet_jax.optimizer import Optimizer, set_learning_rate


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array  # base key; step s uses fold_in(rng, s)
    plateau: Any  # reduce_on_plateau state, updated only after evaluations


class Trainer:
    """The jitted pieces of one run, built once for a config and a mesh."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        plain_ops: Sequence[str] = (),
        total_steps: int | None = None,
        steps_per_epoch: float | None = None,
    ):
        """`plain_ops`: an ablation, see AlexNet.plain_ops; `total_steps` and
        `steps_per_epoch`: the run's length and its epochs' (for the schedule)."""
        self.mesh = mesh
        self.total_steps = total_steps
        self.model = AlexNet.from_config(config.model, plain_ops=tuple(plain_ops))
        self.optimizer = Optimizer.from_config(
            config.optimizer, config.batch_size, total_steps, steps_per_epoch
        )
        self.image_size = config.input.image_size
        self.batch_size = config.batch_size
        abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        specs = parallel.param_specs(self.model, abstract.params, mesh)
        self.shardings = parallel.state_shardings(self.optimizer.tx, abstract, specs, mesh)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            self.shardings,
        )
        params = self.abstract_state.params
        replicated = parallel.replicated(mesh)
        self.loss_fn = parallel.make_loss_fn(self.model, params, mesh)
        self.normalize = parallel.batch_fn(device_input.normalize, mesh)
        self.train_step = jax.jit(
            self._train_step, donate_argnums=0, out_shardings=(self.shardings, replicated)
        )
        self.eval_steps = {  # the centre crop (False) and the paper's ten patches (True)
            ten: jax.jit(
                functools.partial(
                    self._eval_step, parallel.make_eval_fn(self.model, params, mesh, ten)
                ),
                out_shardings=replicated,
            )
            for ten in (False, True)
        }
        self.eval_step = self.eval_steps[config.input.eval_ten_crop]
        self.update_plateau = jax.jit(self._update_plateau, out_shardings=self.shardings.plateau)

    def _init(self, key: jax.Array) -> TrainState:
        x = jnp.zeros((1, self.image_size, self.image_size, 3))
        params = self.model.init(key, x, train=False)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.optimizer.tx.init(params),
            rng=jax.random.fold_in(key, 1),
            plateau=self.optimizer.plateau.init(params),
        )

    def _update_plateau(self, plateau: Any, top1_error: jax.Array) -> Any:
        """The plateau rule's state after an evaluation with that top-1 error."""
        return self.optimizer.plateau.update(updates={}, state=plateau, value=top1_error)[1]

    def init_state(self, seed: int) -> TrainState:
        """Initialise directly into the shardings: no device ever holds the whole model."""
        init = jax.jit(self._init, out_shardings=self.shardings)
        return init(jax.random.PRNGKey(seed))

    def zero_sums(self) -> dict[str, jax.Array]:
        """The running sums the loop hands to its first train step (see `_train_step`)."""
        zero = jax.device_put(jnp.zeros((), jnp.float32), parallel.replicated(self.mesh))
        return {k: zero for k in ("loss", "top1_errors", "top5_errors", "count", "learning_rate")}

    def _images(self, batch: Batch, consts: dict | None) -> jax.Array:
        """The model's input: the batch's images, normalised here when they are uint8 crops."""
        if not batch.raw:
            return batch.images
        if consts is None:
            raise ValueError(
                "a batch of uint8 crops needs the constants that normalise it "
                "(transforms.device_constants)"
            )
        return self.normalize(batch, consts)

    def _train_step(
        self,
        state: TrainState,
        batch: Batch,
        totals: dict | None = None,
        consts: dict | None = None,
    ) -> tuple[TrainState, dict]:
        """One SGD step. Returns its metric sums and learning rate; given `totals` (the sums of
        earlier steps), the sums are added to them here rather than by a dispatch per metric.
        A batch of uint8 crops is normalised with `consts` (transforms.device_constants)
        first."""
        images, labels = self._images(batch, consts), batch.labels
        key = jax.random.fold_in(state.rng, state.step)
        masks = parallel.dropout_masks(key, self.model, images.shape[0], self.image_size, self.mesh)
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
        (_, sums), grads = grad_fn(state.params, images, labels, masks)
        lr = self.optimizer.schedule(state.step) * state.plateau.scale
        opt_state = set_learning_rate(state.opt_state, lr)
        updates, opt_state = self.optimizer.tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if totals is not None:
            sums = {k: totals[k] + v for k, v in sums.items()}
        return new, {**sums, "learning_rate": lr}

    def _eval_step(
        self, eval_fn: Callable, params: Any, batch: Batch, consts: dict | None = None
    ) -> dict:
        """Metric sums of one eval batch (see `_train_step` for `consts`)."""
        return eval_fn(params, self._images(batch, consts), batch.labels, batch.weights)

    def input_constants(self, consts: dict[str, np.ndarray] | None) -> dict | None:
        """`consts` (transforms.device_constants: what normalises uint8 batches) on every
        device; None for batches normalised on the host."""
        if consts is None:
            return None
        return jax.device_put(consts, parallel.replicated(self.mesh))

    def evaluate(
        self,
        state: TrainState,
        batches: Iterable[Batch],
        ten_crop: bool | None = None,
        prefix: str = "eval",
        consts: dict | None = None,
    ) -> dict[str, float]:
        """Means over every example of `batches` (rows of weight 0 are padding); `ten_crop`
        batches hold the ten patches of each image (default: as the config says)."""
        step = self.eval_step if ten_crop is None else self.eval_steps[ten_crop]
        sums = Accumulator(backend.dispatch_depth(jax.default_backend()))
        for local in batches:
            sums.add(
                step(state.params, parallel.global_batch(self.mesh, local, self.batch_size), consts)
            )
        total = sums.pop()
        return {**means(total, prefix), f"{prefix}/count": int(total["count"])}
