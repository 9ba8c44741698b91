"""Orbax checkpoints: periodic saves with the config beside the state, auto-resume, and
`load_checkpoint` for notebooks on whatever devices the caller has."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from alexnet_jax.errors import UsageError


def _name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/fc6/kernel': shape, ...} for a state, an abstract state or Orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def describe_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple]) -> list[str]:
    """Lines naming every array whose shape differs, or that only one side has."""
    lines = []
    for name in sorted(set(saved) | set(wanted)):
        a, b = saved.get(name), wanted.get(name)
        if a != b:
            lines.append(
                f"  {name}: checkpoint {a if a is not None else 'absent'}, "
                f"this run {b if b is not None else 'absent'}"
            )
    return lines


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    """Named handlers, so a fresh manager can read metadata before any restore."""
    return {
        "state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
    }


class Checkpointer:
    """workdir/checkpoints: the train state, the config and what predict needs of the data
    (class names, input statistics), saved together at a step."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = Path(workdir).expanduser().resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_handlers()
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_compatible(self, abstract_state: Any) -> None:
        """Refuse (before anything is written) a checkpoint whose arrays differ from this run's."""
        step = self.latest_step()
        if step is None:
            return
        saved = flat_shapes(
            self._read(step, lambda: self.manager.item_metadata(step)["state"].tree)
        )
        lines = describe_mismatch(saved, flat_shapes(abstract_state))
        params = [line for line in lines if line.startswith("  params/")]
        lines = params or lines  # optimizer slots mirror the parameters: name those
        if lines:
            raise UsageError(
                f"The checkpoint at step {step} in {self.directory} does not fit this run's "
                "model (a different config?):\n" + "\n".join(lines[:20]) + "\nUse a new "
                "--workdir, or the config that wrote it (saved beside it as config). Nothing "
                "was changed."
            )

    def restore(self, abstract_state: Any) -> Any | None:
        """The newest state, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
        step = self.latest_step()
        if step is None:
            return None
        self.check_compatible(abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self._read(step, lambda: self.manager.restore(step, args=args))["state"]

    def _read(self, step: int, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            first = (str(e).splitlines() or [""])[0][:300]
            raise UsageError(
                f"The checkpoint at step {step} in {self.directory} could not be read "
                f"({type(e).__name__}: {first}). To resume from an earlier checkpoint, move "
                f"{self.directory / str(step)} out of the directory; nothing was deleted."
            ) from e

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict, data: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config.to_dict()),
                data=ocp.args.JsonSave(data),
            ),
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@dataclasses.dataclass
class Restored:
    """What `load_checkpoint` returns; `predict` maps uint8 NHWC images to class probabilities."""

    model: Any
    params: Any
    config: ml_collections.ConfigDict
    step: int
    class_names: list[str]
    predict: Callable[[np.ndarray], np.ndarray]


def load_checkpoint(
    workdir: str, step: int | None = None, device: jax.Device | None = None
) -> Restored:
    """Restore a run's parameters onto one device (default: the first), whatever mesh wrote them."""
    from alexnet_jax import input_pipeline, train  # train imports this module

    directory = Path(workdir).expanduser().resolve() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(
            f"No checkpoints in {directory}: train first with "
            f"`python launch.py --config=... --workdir={workdir}`."
        )
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    meta = manager.item_metadata(step)["state"].tree
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            config=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
        ),
    )
    manager.close()
    config = ml_collections.ConfigDict(restored["config"])
    model = train.build_model(config)
    params = restored["state"]["params"]
    data = restored["data"]
    stats = input_pipeline.Stats.from_dict(data["stats"])
    apply = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)))

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UsageError(f"predict wants uint8 images [N, H, W, 3], got {images.shape}.")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        cfg = config.input.copy_and_resolve_references()
        cfg.eval_ten_crop = False
        batch = np.stack([input_pipeline.eval_preprocess(im, stats, cfg).numpy() for im in images])
        return np.asarray(apply(params, batch))

    return Restored(model, params, config, int(step), list(data["class_names"]), predict)
