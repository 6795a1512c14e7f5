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


def _write_replicated_arrays_whole() -> None:
  """In a single-process run, orbax writes each replicated array from one device, whole.

  Its default, replica-parallel saving, splits every replicated array across the devices holding it,
  so that each host of a multi-host job writes a part. In one process every part goes to the same disk:
  it only costs an eager slice per array and device, and a compile per distinct shape (about 250
  compiles, ~10 s, on the first save of a small NVAE with 4 devices). Multi-host runs keep orbax's
  default. Affects orbax's handler for `jax.Array` in this process (set once, on the first Checkpointer).
  """
  global _HANDLER_SET
  if _HANDLER_SET or jax.process_count() > 1:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False, array_metadata_store=getattr(default, "_array_metadata_store", None)),
      override=True)
  _HANDLER_SET = True


_HANDLER_SET = False


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class Checkpointer:
  """Saves `{'state': pytree, 'config': json}` per step under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, max_to_keep: Optional[int] = 3, read_only: bool = False,
               subdir: str = "checkpoints"):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, subdir)
    _write_replicated_arrays_whole()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only))

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def delete(self, step: int) -> None:
    self.manager.wait_until_finished()
    self.manager.delete(step)

  def quarantine(self, step: int, folder: str = "checkpoints_unreadable") -> str:
    """Moves a checkpoint out of the way (to `<workdir>/<folder>/<step>`, kept for inspection, never
    deleted) so that the previous one becomes the latest."""
    self.manager.wait_until_finished()
    dest = os.path.join(self.workdir, folder, str(step))
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

    A latest checkpoint whose metadata does not read (a torn write) is moved to
    `<workdir>/checkpoints_unreadable` and the one before is tried. One whose arrays do not fit the state
    (another device count or config: structure, shapes, dtypes) raises `CheckpointMismatchError`; one that
    fits but does not restore raises too — nothing is moved then, and a run that had checkpoints never
    silently starts afresh."""
    shapes = jax.eval_shape(init_fn, *args)
    shardings = sharding(shapes) if callable(sharding) else jax.tree.map(lambda _: sharding, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    moved = []
    while (step := self.latest_step()) is not None:
      mismatch = self._mismatch(step, target)
      if mismatch:
        raise CheckpointMismatchError(
            f"checkpoint {step} in {self.directory} does not fit this run ({mismatch}): it was written with "
            f"another config or device count; use the same ones, or another --workdir")
      if mismatch is None:               # its metadata does not read: a torn write
        if jax.process_count() > 1:      # every process would move it: leave it to the user
          raise CheckpointMismatchError(f"checkpoint {step} in {self.directory} is unreadable; move it out of "
                                        f"{self.directory} and rerun to resume from the one before")
        moved.append(self.quarantine(step))
        logging.warning("checkpoint %d in %s is unreadable (torn write); moved to %s, resuming from the one "
                        "before", step, self.directory, moved[-1])
        continue
      try:
        state = self.restore(target, step)
      except Exception as e:   # noqa: BLE001 — fits but does not read: say so, move nothing
        raise CheckpointMismatchError(
            f"checkpoint {step} in {self.directory} fits this run but does not restore ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); if it is damaged, move it out of "
            f"{self.directory} to resume from the one before") from e
      logging.info("Resumed from %s at step %d", self.directory, int(state.step))
      return state
    if moved:
      raise CheckpointMismatchError(f"no readable checkpoint left in {self.directory} (moved aside: "
                                    f"{', '.join(moved)}); to start afresh, use another --workdir")
    return jax.jit(init_fn, out_shardings=shardings)(*args)

  def _mismatch(self, step: int, target: Any) -> Optional[str]:
    """None if the saved state's metadata does not read, '' if its arrays fit `target` (same leaves,
    shapes and dtypes), else the first misfit."""
    try:
      with ocp.PyTreeCheckpointer() as reader:
        saved = reader.metadata(os.path.join(self.step_path(step), "state"))
      saved = getattr(saved, "item_metadata", saved)     # StepMetadata or TreeMetadata, by orbax version
      saved = getattr(saved, "tree", saved)
      saved = {_path_str(p): (tuple(m.shape), str(getattr(m, "dtype", ""))) for p, m in
               jax.tree.leaves_with_path(saved, is_leaf=lambda x: hasattr(x, "shape"))}
    except Exception:   # noqa: BLE001
      return None
    if not saved:                     # a torn metadata file reads as an empty tree
      return None
    wanted = {_path_str(p): leaf for p, leaf in jax.tree.leaves_with_path(target)}
    for key, leaf in wanted.items():
      if key not in saved:
        return f"{key} is not in it"
      shape, dtype = saved[key]
      if shape != tuple(leaf.shape):
        return f"{key} has shape {shape}, this run needs {tuple(leaf.shape)}"
      if dtype and dtype != str(leaf.dtype):
        return f"{key} is {dtype}, this run needs {leaf.dtype}"
    extra = sorted(set(saved) - set(wanted))
    if extra:
      return f"it holds {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}, which this run has not"
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
