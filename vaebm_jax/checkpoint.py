"""A thin wrapper over orbax's CheckpointManager: state + the config as JSON, resume from latest."""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from vaebm_jax import parallel
from vaebm_jax.errors import CheckpointMismatchError  # noqa: F401  (also re-exported from here)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class Checkpointer:
  """Saves `{'state': pytree, 'config': json}` per step under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, max_to_keep: Optional[int] = 3, read_only: bool = False,
               subdir: str = "checkpoints"):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, subdir)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only))

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def delete(self, step: int) -> None:
    self.manager.wait_until_finished()
    self.manager.delete(step)

  def quarantine(self, step: int) -> str:
    """Moves an unreadable checkpoint out of the way (to `<workdir>/checkpoints_unreadable/<step>`, kept for
    inspection, never deleted) so that the previous one becomes the latest."""
    dest = os.path.join(self.workdir, "checkpoints_unreadable", str(step))
    if os.path.exists(dest):
      shutil.rmtree(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(self.step_path(step), dest)
    self.manager.reload()
    return dest

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())))

  def restore(self, target: Any, step: Optional[int] = None) -> Any:
    """Restores the state into the structure, dtypes and shardings of `target` (e.g. eval_shape).

    Leaves without a sharding are restored replicated over this process's devices, so a checkpoint
    written on one device topology loads on another.
    """
    step = self.latest_step() if step is None else step
    replicated = parallel.replicated(parallel.create_mesh())
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or replicated), target)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"]

  def restore_items(self, step: int, target: dict) -> dict:
    """Restores only the top-level items of the saved state named in `target` (e.g. 'params',
    'batch_stats'), replicated over this process's devices; the rest (optimiser, buffer) is not read."""
    replicated = parallel.replicated(parallel.create_mesh())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), target)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    return dict(restored["state"])

  def restore_or_initialize(self, init_fn, *args, sharding) -> Any:
    """The latest checkpoint restored with `sharding`, or `jit(init_fn, out_shardings=...)(*args)` for a
    fresh run. `sharding`: one sharding for every leaf, or a function from the state's shapes to a tree
    of shardings (e.g. a replay buffer sharded over the data axis).

    An unreadable latest checkpoint (a torn write) is moved to `<workdir>/checkpoints_unreadable` and the
    one before is tried; one that reads but does not fit the state (another device count or config)
    raises `CheckpointMismatchError`."""
    shapes = jax.eval_shape(init_fn, *args)
    shardings = sharding(shapes) if callable(sharding) else jax.tree.map(lambda _: sharding, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    while (step := self.latest_step()) is not None:
      mismatch = self._shape_mismatch(step, target)
      if mismatch:
        raise CheckpointMismatchError(
            f"checkpoint {step} in {self.directory} does not fit this run ({mismatch}): it was written with "
            f"another config or device count; use the same ones, or another --workdir")
      try:
        state = self.restore(target, step)
        logging.info("Resumed from %s at step %d", self.directory, int(state.step))
        return state
      except Exception as e:   # noqa: BLE001 — a partial or corrupted write (kill -9, full disk, ...)
        error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      if jax.process_count() > 1:   # every process would move it: leave it to the user
        raise RuntimeError(f"checkpoint {step} in {self.directory} is unreadable ({error}); move it out of "
                           f"{self.directory} and rerun to resume from the one before")
      moved = self.quarantine(step)
      logging.warning("checkpoint %d in %s is unreadable (%s); moved to %s, resuming from the one before",
                      step, self.directory, error, moved)
    return jax.jit(init_fn, out_shardings=shardings)(*args)

  def _shape_mismatch(self, step: int, target: Any) -> Optional[str]:
    """None if the saved state's metadata does not read, '' if its shapes fit `target`, else the first misfit."""
    try:
      with ocp.PyTreeCheckpointer() as reader:
        saved = reader.metadata(os.path.join(self.step_path(step), "state"))
      saved = getattr(saved, "item_metadata", saved)     # StepMetadata or TreeMetadata, by orbax version
      saved = getattr(saved, "tree", saved)
      saved = {_path_str(p): tuple(m.shape) for p, m in
               jax.tree.leaves_with_path(saved, is_leaf=lambda x: hasattr(x, "shape"))}
    except Exception:   # noqa: BLE001
      return None
    if not saved:                     # a torn metadata file reads as an empty tree
      return None
    for path, leaf in jax.tree.leaves_with_path(target):
      key = _path_str(path)
      if key not in saved:
        return f"{key} is not in it"
      if saved[key] != tuple(leaf.shape):
        return f"{key} has shape {saved[key]}, this run needs {tuple(leaf.shape)}"
    return ""

  def restore_config(self, step: Optional[int] = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
