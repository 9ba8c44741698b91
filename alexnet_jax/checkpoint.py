"""Orbax checkpoints in workdir/checkpoints: the train state with the config and what predict
needs of the data beside it; periodic saves (a failed one named in one line), auto-resume (of
the same run only), and reads onto any devices."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from alexnet_jax import checksums, lifecycle
from alexnet_jax.errors import UsageError

# The layout of the saved train state's tree, stored with every checkpoint (absent: 1). A run
# resumes only its own layout; the parameters load whatever the layout (`read`).
STATE_LAYOUT = 2
LAYOUT_CHANGES = {2: "the optimizer's learning rate became a hyperparameter set by name"}


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/fc6/kernel': shape, ...} for a state, an abstract state or Orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {checksums.path_name(path): tuple(leaf.shape) for path, leaf in leaves}


def describe_mismatch(
    saved: dict[str, tuple],
    wanted: dict[str, tuple],
    sides: tuple[str, str] = ("checkpoint", "this run"),
) -> list[str]:
    """Lines naming every array whose shape differs, or that only one side has."""
    lines = []
    for name in sorted(set(saved) | set(wanted)):
        a, b = saved.get(name), wanted.get(name)
        if a != b:
            lines.append(
                f"  {name}: {sides[0]} {a if a is not None else 'absent'}, "
                f"{sides[1]} {b if b is not None else 'absent'}"
            )
    return lines


# Fields a resumed run may change: how long it runs, how often it reports, where the data and
# the devices are, how fast the same computation runs. Any other change (seed, batch, model,
# optimizer, augmentation) makes the rest of the run another one: refused unless asked for.
FREE_ON_RESUME = (
    "num_train_steps",
    "num_epochs",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "profile_steps",
    "per_device_batch_size",  # batch_size, which it sets, is compared
    "mesh.",
    "model.fast_ops",
    "input.data_dir",
    "input.manual_dir",
    "input.stage_dir",
    "input.loader",
    "input.skip_corrupt",
    "input.normalize_on_device",
    "input.eval_ten_crop",
    "input.stats_max_images",  # a resumed run keeps its checkpoint's statistics
    "input.shuffle_buffer",
)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """(field, saved value, this run's value) for every field that differs. Fields the saved
    config lacks (it predates them) are not changes."""
    now = _flat(json.loads(json.dumps(config.to_dict())))  # tuples as the saved JSON has them
    old = _flat(saved)
    return [(k, old[k], now[k]) for k in sorted(now) if k in old and old[k] != now[k]]


def check_resume(
    saved: dict, config: ml_collections.ConfigDict, step: int, workdir: os.PathLike, allow: bool
) -> None:
    """Log the fields changed since the checkpoint at `step`; refuse (UsageError) the ones
    outside FREE_ON_RESUME unless `allow`, or nothing has been trained (step 0: converted
    weights)."""
    changes = config_changes(saved, config)
    describe = lambda cs: ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in cs)
    other = [c for c in changes if not c[0].startswith(FREE_ON_RESUME)]
    if other and step > 0 and not allow:
        raise UsageError(
            f"{workdir} was trained to step {step} with other settings: {describe(other)}. "
            "Resuming with these would make the rest another run. Use the settings it was "
            "trained with (its checkpoint's config), a new --workdir, or pass "
            "--allow_config_changes to resume with them. Nothing was changed."
        )
    if changes:
        logging.warning("resuming step %d with changed settings: %s", step, describe(changes))


@dataclasses.dataclass
class Saved:
    """One checkpoint as `Checkpointer.read` returns it."""

    step: int
    state: Any  # the train state as a nested dict of arrays
    config: ml_collections.ConfigDict
    data: dict  # class_names, stats (see train.py)
    mean_image: np.ndarray | None = None  # the input's mean image, where the run used one


class Checkpointer:
    """workdir/checkpoints: the train state, the config and what predict needs of the data
    (class names, input statistics), saved together at a step."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, read_only: bool = False):
        self.directory = lifecycle.workdir_path(workdir) / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(
                f"No checkpoints in {self.directory}: train first with "
                f"`python launch.py --config=... --workdir={workdir}`."
            )
        if not read_only and self.directory.is_dir():
            # Orbax writes a step under a temporary name and renames it when complete: these
            # are saves a killed run never finished. The newest complete step is restored.
            partial = sorted(p.name for p in self.directory.glob("*.orbax-checkpoint-tmp*"))
            if partial and jax.process_index() == 0:
                logging.warning("removing incomplete checkpoints of a killed run: %s", partial)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        # Named handlers, so a fresh manager can read metadata before any restore.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "mean_image": ocp.StandardCheckpointHandler(),  # saved only where there is one
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._saving: int | None = None  # the step of the save in flight
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_compatible(self, abstract_state: Any, optimizer: str | None = None) -> None:
        """Refuse (before anything is written) a checkpoint this run cannot resume: another
        layout of the train state, another `optimizer` (by name), or arrays of other shapes
        (another model config)."""
        step = self.latest_step()
        if step is None:
            return
        data = self.data(step)
        layout = data.get("state_layout", 1)
        if layout != STATE_LAYOUT:
            changes = "; ".join(LAYOUT_CHANGES[v] for v in range(layout + 1, STATE_LAYOUT + 1))
            why = (
                f"predates a change of the train state's layout ({changes})"
                if layout < STATE_LAYOUT
                else "was written by a newer version of alexnet_jax"
            )
            raise UsageError(
                f"The checkpoint at step {step} in {self.directory} {why}: it has layout "
                f"{layout}, this version resumes layout {STATE_LAYOUT}. Its parameters still "
                "load with alexnet_jax.load_checkpoint. Use a new --workdir, or finish the run "
                "with the version of alexnet_jax that wrote it. Nothing was changed."
            )
        written = data.get("optimizer", "sgd")  # the only one before LARS
        if optimizer is not None and written != optimizer:
            raise UsageError(
                f"The checkpoint at step {step} in {self.directory} was written by "
                f"optimizer.name={written}, and this run asks for {optimizer}: their states "
                f"differ. Resume with --config.optimizer.name={written}, or use a new --workdir."
            )
        saved = flat_shapes(self._state_metadata(step))
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

    def data(self, step: int) -> dict:
        """The record saved beside the state at `step`: class names, input statistics..."""
        return self._json(step, "data")

    def config(self, step: int) -> dict:
        """The config saved at `step`, as a dict (what the run that wrote it was told)."""
        return self._json(step, "config")

    def _json(self, step: int, item: str) -> dict:
        args = ocp.args.Composite(**{item: ocp.args.JsonRestore()})
        return self._read(step, lambda: self.manager.restore(step, args=args))[item]

    def mean_image(self, step: int) -> np.ndarray | None:
        """The input's mean image saved at `step`, where the run used one."""
        if not self._read(step, lambda: self.manager.item_metadata(step)).get("mean_image"):
            return None
        args = ocp.args.Composite(mean_image=ocp.args.StandardRestore())
        r = self._read(step, lambda: self.manager.restore(step, args=args))
        self._verify(step, r["mean_image"])
        return np.asarray(r["mean_image"]["mean_image"])

    def evaluated(self, step: int) -> bool:
        """Whether the state saved at `step` includes that step's evaluation (checkpoints
        written before the loop saved ahead of evaluating did)."""
        return self.data(step).get("evaluated", True)

    def restore(
        self,
        abstract_state: Any,
        optimizer: str | None = None,
        config: ml_collections.ConfigDict | None = None,
        allow_changes: bool = False,
    ) -> Any | None:
        """The newest intact state, laid out as `abstract_state` (ShapeDtypeStructs with
        shardings), if `optimizer` (a name; None: not checked) wrote it and, given this run's
        `config`, if it is the same run (`check_resume`). A damaged checkpoint (unreadable,
        or arrays that do not match their checksums) is named and set aside, never deleted,
        and the one before it is tried; None when none is left."""
        damaged = []
        while (step := self.latest_step()) is not None:
            self.check_compatible(abstract_state, optimizer)
            if config is not None:
                check_resume(self.config(step), config, step, self.directory.parent, allow_changes)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            try:
                state = self._read(step, lambda s=step, a=args: self.manager.restore(s, args=a))
                self._verify(step, state["state"])
                return state["state"]
            except Damaged as e:
                damaged.append(self._set_aside(step, e))
        if damaged:
            raise UsageError(
                f"No intact checkpoint is left in {self.directory}: the damaged ones were moved "
                f"to {', '.join(map(str, damaged))}. Remove them to train from the start."
            )
        return None

    def read(self, step: int | None, sharding: jax.sharding.Sharding) -> Saved:
        """Checkpoint `step` (default: the newest) with every array on `sharding`, whatever
        mesh wrote it: the target is built from the saved metadata, not from a config."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory} holds no finished checkpoint.")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"No checkpoint at step {step} in {self.directory}; it holds steps "
                f"{sorted(self.manager.all_steps())}."
            )
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
            self._state_metadata(step),
        )
        items = {
            "state": ocp.args.StandardRestore(target),
            "config": ocp.args.JsonRestore(),
            "data": ocp.args.JsonRestore(),
        }
        args = ocp.args.Composite(**items)
        r = self._read(step, lambda: self.manager.restore(step, args=args))
        try:
            self._verify(step, r["state"], r["data"])
        except Damaged as e:
            steps = sorted(self.manager.all_steps())
            raise Damaged(
                f"{e} Read another step (the directory holds steps {steps}); a training run "
                "resumes from the newest intact one."
            ) from None
        config = ml_collections.ConfigDict(r["config"])
        return Saved(int(step), r["state"], config, r["data"], self.mean_image(step))

    def _state_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata (shapes, dtypes), read without the arrays."""
        return self._read(step, lambda: self.manager.item_metadata(step)["state"].tree)

    def _verify(self, step: int, tree: Any, data: dict | None = None) -> None:
        """Raise Damaged if arrays of `tree` (restored from `step`) differ from the checksums
        saved with them (checkpoints written before checksums were: not checked)."""
        saved = (data or self.data(step)).get("checksums")
        if not saved:
            return
        names = checksums.checksums(tree).keys()
        bad = checksums.differing({k: v for k, v in saved.items() if k in names}, tree)
        if bad:
            raise Damaged(
                f"The checkpoint at step {step} in {self.directory} is damaged: "
                f"{', '.join(bad[:4])}{' and more' if len(bad) > 4 else ''} "
                f"{'differs' if len(bad) == 1 else 'differ'} from the checksums saved with "
                f"{'it' if len(bad) == 1 else 'them'}."
            )

    def _set_aside(self, step: int, damage: Damaged) -> Any:
        """Move a damaged checkpoint out of the steps Orbax sees (kept, never deleted)."""
        aside = self.directory / f"damaged_step_{step}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"alexnet_jax/damaged/{step}")
        logging.warning("%s It was moved to %s; trying the checkpoint before it.", damage, aside)
        print(f"{damage} It was moved to {aside}.", file=sys.stderr, flush=True)
        self.manager.reload()
        return aside

    def _read(self, step: int, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            first = (str(e).splitlines() or [""])[0][:300]
            raise Damaged(
                f"The checkpoint at step {step} in {self.directory} could not be read "
                f"({type(e).__name__}: {first}). To resume from an earlier checkpoint, move "
                f"{self.directory / str(step)} out of the directory; nothing was deleted."
            ) from e

    def save(
        self,
        step: int,
        state: Any,
        config: ml_collections.ConfigDict,
        data: dict,
        mean_image: np.ndarray | None = None,
    ) -> None:
        sums = checksums.checksums(state)
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config.to_dict()),
        }
        if mean_image is not None:
            items["mean_image"] = ocp.args.StandardSave({"mean_image": mean_image})
            sums |= checksums.checksums({"mean_image": mean_image})
        record = {**data, "state_layout": STATE_LAYOUT, "checksums": sums}
        items["data"] = ocp.args.JsonSave(record)
        self.wait()  # as Orbax's save does first; a failure of the previous save is named as its
        self._guard(lambda: self.manager.save(step, args=ocp.args.Composite(**items)), step)
        self._saving = step

    def check(self) -> None:
        """Raise SaveFailed if a save running in the background has failed (cheap)."""
        self._guard(self.manager.check_for_errors)

    def wait(self) -> None:
        """Until the saves begun are on disk."""
        self._guard(self.manager.wait_until_finished)

    def close(self) -> None:
        if self._failed:  # already reported; the rest of Orbax's work has nowhere to go
            return
        self.wait()
        self.manager.close()

    def intact_steps(self) -> list[int]:
        """The steps whose saves finished (renamed from their temporary names), on disk."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def _guard(self, call: Callable[[], Any], step: int | None = None) -> None:
        try:
            call()
        except Exception as e:  # Orbax/TensorStore wrap OS errors in many types
            self._failed = True
            step = self._saving if step is None else step
            raise SaveFailed(self._failure(step, e)) from None

    def _failure(self, step: int | None, e: Exception) -> str:
        text = str(e)
        first = (text.splitlines() or [""])[0]
        full = "No space left on device" in text or "os_error_code='28'" in text
        why = (
            f"the disk holding it is full (check with `df -h {self.directory}`)"
            if full
            else f"{type(e).__name__}: {first[:300]}"
        )
        intact = self.intact_steps()
        newest = f"step {intact[-1]}" if intact else "none"
        return (
            f"Saving the checkpoint of step {step} in {self.directory} failed: {why}. The run "
            f"stopped. The newest intact checkpoint is {newest}; free space (or fix "
            "the directory) and run the same command to resume from it."
        )


class Damaged(UsageError):
    """A checkpoint that cannot be read back as it was written."""


class SaveFailed(UsageError):
    """A checkpoint could not be written (a full disk, lost permissions, ...)."""
