"""Training checkpoints on Orbax: sharded, asynchronous, atomic, keep-last-N, restorable onto any mesh.

A run's directory holds one folder per checkpoint, `step_NNNNNNNN/`, with two items: `state` (the training state:
params, router biases, optimizer state, step counter and, when the IR asks for one, the EMA; every process writes
the shards its devices own, as OCDBT/tensorstore files) and `meta` (JSON: the step, the run's planned length for the
learning-rate schedule, the IR the run was compiled from, the data source's iterator state, the count of skipped
steps). Orbax writes a checkpoint under a temporary name and renames it into place once every process has finished
its shards, so a process killed at any moment leaves the previous checkpoints whole and the half-written one
invisible. A save returns once the state is copied to host memory; the files are written in the background while
training goes on.

Restoring reads each array straight into the shardings of the program being resumed, so a checkpoint written by
two processes on one mesh restores into one process, or onto eight devices with another mesh.

safetensors remains the exchange format (`params_io.py`, import and export); this is the training checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..frontend.errors import UserError

STEP_PREFIX = "step"
FORMAT = "dsv3c-orbax-1"

# Orbax reports every save and restore at INFO through absl; the training loop says what matters itself.
logging.getLogger("absl").setLevel(logging.WARNING)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}_{step:08d}"


class Checkpoints:
    """The checkpoints of one run directory. All processes of a multi-process run construct it and call `save` and
    `restore` together (Orbax synchronises them)."""

    def __init__(self, directory: str | Path, keep: int = 3, create: bool = True):
        self.directory = Path(directory)  # as the user wrote it, for messages
        self.root = self.directory.absolute()
        _refuse_legacy(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=True, step_prefix=STEP_PREFIX,
            step_format_fixed_length=8,
        )
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.root, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step (a half-written one is never listed)."""
        self._manager.reload()
        return self._manager.latest_step()

    def path(self, step: int) -> Path:
        return self.directory / step_dir_name(step)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Starts writing `state` for `step`; returns once it is safe to go on training (and to donate `state`)."""
        meta = {"format": FORMAT, "step": step, **meta}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON item of a checkpoint."""
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as err:  # noqa: BLE001 - any failure to read is a damaged checkpoint, reported as such
            raise UserError(f"checkpoint {self.path(step)}: unreadable metadata ({_reason(err)})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"checkpoint {self.path(step)}: not a dsv3c training checkpoint")
        return meta

    def stored_arrays(self, step: int) -> dict[str, Any]:
        """The saved state's tree of array metadata (shapes, dtypes), read without loading any array."""
        try:
            return dict(self._manager.item_metadata(step)["state"].tree)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"checkpoint {self.path(step)}: unreadable state metadata ({_reason(err)})") from None

    def restore(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
        """The saved state, each array placed as `target` (a tree of `jax.ShapeDtypeStruct`s with shardings) says.
        Items of the checkpoint that `target` lacks are not read."""
        stored = self.stored_arrays(step)
        for group in ("params", "router_bias"):
            _check_same_arrays(self.path(step), group, stored.get(group, {}), target.get(group, {}))
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        return self.read(step, target, restore_args, "cannot restore the training state (written with another "
                         "optimizer configuration?)")

    def read(self, step: int, target: dict[str, Any], restore_args: dict[str, Any], failure: str) -> dict[str, Any]:
        """The arrays of `target` (a sub-tree of the saved state), read as `restore_args` say; `failure` opens the
        message of the user error a damaged checkpoint raises."""
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(state=args)).state
        except Exception as err:  # noqa: BLE001
            raise UserError(f"checkpoint {self.path(step)}: {failure} ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _refuse_legacy(root: Path) -> None:
    if (root / "latest").is_file() and any(root.glob("step_*/state.safetensors")):
        raise UserError(f"{root} holds a safetensors checkpoint of an earlier dsv3c; training checkpoints are now "
                        "Orbax directories: start a new --ckpt directory")


def _check_same_arrays(path: Path, group: str, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """The checkpoint's parameters are the program's, by name and shape: otherwise it belongs to another model."""
    for name, leaf in wanted.items():
        if name not in stored:
            raise UserError(f"checkpoint {path} lacks {group} '{name}': it was written for a different model")
        if tuple(stored[name].shape) != tuple(leaf.shape):
            raise UserError(f"checkpoint {path}: {group} '{name}' has shape {list(stored[name].shape)}, the model's "
                            f"is {list(leaf.shape)} (a different model?)")
    extra = sorted(set(stored) - set(wanted))
    if extra:
        raise UserError(f"checkpoint {path} has {group} '{extra[0]}' that the model lacks: it was written for a "
                        "different model")


def latest_meta(directory: str | Path) -> dict[str, Any] | None:
    """The metadata of the newest checkpoint in `directory` (its step, the run's `total_steps`, ...), or None; read
    before compiling a resumed run, whose learning-rate schedule must be the one the run began with."""
    if not Path(directory).is_dir():
        return None
    checkpoints = Checkpoints(directory, create=False)
    try:
        step = checkpoints.latest_step()
        return None if step is None else checkpoints.meta(step)
    finally:
        checkpoints.close()


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a run directory of training checkpoints or one `step_N` folder of one."""
    path = Path(path)
    return (path / "state").is_dir() and (path / "meta").is_dir() or any(path.glob(f"{STEP_PREFIX}_*/state"))


def load_checkpoint_params(ckpt_dir: str | Path, ema: bool = False) -> dict[str, np.ndarray]:
    """Every parameter of a training checkpoint as host arrays named as in the IR (router biases included): the
    trained parameters, or with `ema` their moving average. `ckpt_dir` is a run directory (its newest checkpoint)
    or one `step_N` folder. For generation and export; a checkpoint without an EMA asked for one is an error."""
    path = Path(ckpt_dir).absolute()
    if (path / "state").is_dir() and path.name.startswith(f"{STEP_PREFIX}_"):
        root, step = path.parent, int(path.name.removeprefix(f"{STEP_PREFIX}_"))
    else:
        root, step = path, None
    if not root.is_dir():
        raise UserError(f"{path}: no committed training checkpoint (no such directory)")
    checkpoints = Checkpoints(root, create=False)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{path}: no committed training checkpoint")
        stored = checkpoints.stored_arrays(step)
        source = "ema" if ema else "params"
        if source not in stored:
            raise UserError(f"checkpoint {checkpoints.path(step)} holds no EMA of the parameters (a run keeps one "
                            "when its spec says `train { ema { decay D } }`)")
        groups = {source: stored[source], "router_bias": stored.get("router_bias", {})}
        target = {g: {n: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for n, m in arrays.items()}
                  for g, arrays in groups.items()}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        state = checkpoints.read(step, target, restore_args, "cannot read the parameters")
    finally:
        checkpoints.close()
    return {**state[source], **state["router_bias"]}
