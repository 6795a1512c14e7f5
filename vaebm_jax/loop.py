"""What the two stage loops share: the step loop with its cadence, the finite-update guard, metric
aggregation, image grids and the run's setup (mesh, writer, checkpointer).

`train_vae.train_and_evaluate` and `train_ebm.train_and_evaluate` each build their state, jitted step
and periodic actions, then hand them to `run`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from vaebm_jax import checkpoint, parallel, visualize


def due(step: int, every: int, total: int) -> bool:
  """Periodic actions run every `every` steps (never when 0) and at the last step."""
  return step == total or (every > 0 and step % every == 0)


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite`, else `old`, leaf by leaf: a non-finite loss or gradient leaves the state as it
  was (the update is skipped and counted in the `skipped` metric)."""
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def aggregate_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
  """Means over logged steps (sums for `skipped`); vector metrics become `train_<name>/<index>`."""
  stacked = jax.device_get(history)
  scalars = {}
  for name in stacked[0]:
    values = np.stack([m[name] for m in stacked])
    if values.ndim == 1:
      scalars[f"train/{name}"] = float(values.sum() if name == "skipped" else values.mean())
    else:
      for g, v in enumerate(values.mean(0)):
        scalars[f"train_{name}/{g:02d}"] = float(v)
  return scalars


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update({f"{key}.{k}": v for k, v in flatten_config(value).items()})
    else:
      flat[key] = value if value is not None else "None"
  return flat


def write_images(writer, workdir: str, step: int, images: dict[str, np.ndarray]) -> None:
  """Each batch of images as a PNG grid `<workdir>/images/<name>_<step>.png` and in TensorBoard."""
  grids = {name: visualize.make_grid(np.asarray(img)) for name, img in images.items()}
  for name, grid in grids.items():
    visualize.save_png(grid, os.path.join(workdir, "images", f"{name}_{step:07d}.png"))
  writer.write_images(step, {name: grid[None] for name, grid in grids.items()})


@dataclasses.dataclass
class Run:
  """What a stage loop needs around its model: the mesh, shardings, writer and checkpointer."""
  workdir: str
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  writer: Any
  checkpointer: checkpoint.Checkpointer

  @property
  def replicated(self):
    return parallel.replicated(self.mesh)

  @property
  def data_sharded(self):
    return parallel.data_sharded(self.mesh)

  def shard(self, batch: np.ndarray) -> jax.Array:
    return parallel.shard_batch(batch, self.mesh)


def start(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """The mesh over all devices (checking the global batch divides), the metric writer and checkpointer."""
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams(flatten_config(config))
  return Run(workdir, config, mesh, writer, checkpoint.Checkpointer(workdir, config.train.keep_checkpoints))


def run(state: Any, step_fn: Callable[[Any, jax.Array], tuple[Any, dict]], batches: Iterator[np.ndarray],
        context: Run, *, total_steps: int, actions: Sequence[tuple[int, Callable[[Any, int], Any]]] = (),
        name: str = "train") -> Any:
  """Steps from `state.step` to `total_steps`: `state, metrics = step_fn(state, sharded batch)`, logs
  aggregated metrics every `train.log_every_steps` (warning on skipped non-finite updates), runs each
  `(every, action(state, step))` on its cadence, checkpoints every `train.checkpoint_every_steps`, and
  always at the last step. Closes the checkpointer and flushes the writer."""
  t = context.config.train
  start_step = int(state.step)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=context.writer)] \
      if jax.process_index() == 0 else []
  logging.info("%s: steps %d → %d on %d devices", name, start_step, total_steps, context.mesh.size)
  history = []
  for step in range(start_step + 1, total_steps + 1):
    with jax.profiler.StepTraceAnnotation(name, step_num=step):
      state, metrics = step_fn(state, context.shard(next(batches)))
    history.append(metrics)
    for hook in hooks:
      hook(step)
    if due(step, t.log_every_steps, total_steps):
      scalars = aggregate_metrics(history)
      context.writer.write_scalars(step, scalars)
      if scalars.get("train/skipped"):
        logging.warning("step %d: %d updates skipped for a non-finite loss", step, scalars["train/skipped"])
      history = []
    for every, action in actions:
      if due(step, every, total_steps):
        action(state, step)
    if due(step, t.checkpoint_every_steps, total_steps):
      context.checkpointer.save(step, state, context.config)
  context.checkpointer.close()
  context.writer.flush()
  return state
