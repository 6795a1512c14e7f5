"""What the two stage loops share: the step loop with its cadence, the finite-update guard, metric
aggregation, image grids and the run's setup (mesh, writer, checkpointer).

`train_vae.train_and_evaluate` and `train_ebm.train_and_evaluate` each build their state, jitted step
and periodic actions, then hand them to `run`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vaebm_jax import checkpoint, parallel, visualize
from vaebm_jax.errors import DivergenceError, Preempted  # noqa: F401  (also re-exported from here)


def due(step: int, every: int, total: int) -> bool:
  """Periodic actions run every `every` steps (never when 0) and at the last step."""
  return step == total or (every > 0 and step % every == 0)


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite`, else `old`, leaf by leaf: a non-finite loss or gradient leaves the state as it
  was (the update is skipped and counted in the `skipped` metric)."""
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def update_if_finite(finite: jax.Array, tx: optax.GradientTransformation, grads: Any, params: Any,
                     opt_state: Any) -> tuple[Any, Any]:
  """(params, opt_state) after `tx`'s update where `finite`, else both unchanged (`keep_if_finite` for the
  optimiser's step).

  A `lax.cond`, not a select of old and new: XLA:CPU emits one pass per output array (parameters and
  each moment), each recomputing what it needs from the old values, so updating in place (donated
  state) made it copy the old parameters and both moments first. The CIFAR-10 NVAE's Adamax step over
  its 130.7 M parameters took 0.42–0.43 s that way and 0.13 s inside the cond, which runs only the
  branch it takes and writes each array in place (`experiments/benchmark_optimizer.py`, RESULTS.md).
  """
  def update(operands):
    params, opt_state = operands
    updates, new_opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt_state

  return jax.lax.cond(finite, update, lambda operands: operands, (params, opt_state))


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
  # clu is imported here, not at the top: its writers import TensorFlow, which the train steps
  # (benchmarks, notebooks on accelerator images without TensorFlow) do not need.
  from clu import metric_writers
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams(flatten_config(config))
  return Run(workdir, config, mesh, writer, checkpoint.Checkpointer(workdir, config.train.keep_checkpoints))



GUARD_RECORD = "guard.json"


@dataclasses.dataclass(frozen=True)
class GuardSettings:
  """`config.guard`: which per-step metrics to watch and what to do when one runs away."""
  enabled: bool
  metrics: tuple[str, ...]
  window: int              # steps of history a value is compared with
  min_history: int         # no runaway check before this many steps of history (non-finite is always checked)
  tolerance: float         # runaway: |x − median| > tolerance × max(1.4826·MAD, 0.01·|median|)
  confirm_steps: int       # a checkpoint is "good" once this many later steps passed the checks
  keep_good: int           # good checkpoints kept in <workdir>/checkpoints_good (rolling retention never touches them)
  lr_factor: float         # learning-rate multiplier after each rollback
  max_rollbacks: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "GuardSettings":
    g = config.get("guard")
    if g is None:
      return cls(False, (), 1, 1, 1.0, 0, 1, 1.0, 0)
    confirm = g.confirm_steps if g.confirm_steps >= 0 else config.train.checkpoint_every_steps
    return cls(g.enabled, tuple(m.strip() for m in g.metrics.split(",") if m.strip()), g.window, g.min_history,
               g.tolerance, confirm, g.keep_good, g.lr_factor, g.max_rollbacks)


class Guard:
  """Checks each step's metrics against the recent history of the same metric."""

  def __init__(self, settings: GuardSettings):
    self.settings = settings
    self.history = {m: collections.deque(maxlen=settings.window) for m in settings.metrics}

  def check(self, step: int, metrics: dict[str, Any]) -> str | None:
    """None if the step looks healthy, else what ran away (and the step's values join the history).

    A step whose update was skipped for a non-finite loss (`skipped` = 1: the state was kept) is not
    judged here; `run` treats a whole check window of skipped updates as a divergence."""
    g = self.settings
    if float(np.asarray(metrics.get("skipped", 0.0))) >= 1.0:
      return None
    for name in g.metrics:
      if name not in metrics:
        continue
      value = float(np.asarray(metrics[name]).mean())
      if not math.isfinite(value):
        return f"step {step}: {name} = {value}"
      h = self.history[name]
      if len(h) >= g.min_history:
        ref = np.asarray(h)
        median = float(np.median(ref))
        scale = max(1.4826 * float(np.median(np.abs(ref - median))), 0.01 * abs(median), 1e-12)
        if abs(value - median) > g.tolerance * scale:
          return (f"step {step}: {name} = {value:.6g}, {abs(value - median) / scale:.0f}× the usual spread from "
                  f"its recent median {median:.6g}")
    for name in g.metrics:
      if name in metrics:
        self.history[name].append(float(np.asarray(metrics[name]).mean()))
    return None


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)      # checkpoint files are immutable once committed: share them
  except OSError:
    shutil.copy2(src, dst)


def _link_checkpoint(src: str, dst: str, workdir: str) -> None:
  """A committed checkpoint directory `src` as `dst` (hard links), appearing there only when complete."""
  tmp = os.path.join(workdir, f".link_tmp_{os.path.basename(dst)}")
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp, copy_function=_link_or_copy)
  os.rename(tmp, dst)


class _GoodCheckpoints:
  """`<workdir>/checkpoints_good`: rolling checkpoints promoted once the guard confirmed them."""

  def __init__(self, context: Run, settings: GuardSettings):
    self.context, self.settings = context, settings
    self.store = checkpoint.Checkpointer(context.workdir, max_to_keep=None, subdir="checkpoints_good")
    self.pending: list[int] = []

  def saved(self, step: int) -> None:
    self.pending.append(step)

  def confirm_through(self, step: int) -> None:
    """Every pending checkpoint with `confirm_steps` healthy steps after it becomes good."""
    ready = [s for s in self.pending if step - s >= self.settings.confirm_steps]
    if not ready:
      return
    self.context.checkpointer.wait()
    for s in ready:
      src, dst = self.context.checkpointer.step_path(s), self.store.step_path(s)
      if jax.process_index() == 0 and os.path.isdir(src) and not os.path.exists(dst):
        _link_checkpoint(src, dst, self.context.workdir)
      self.pending.remove(s)
    if jax.process_index() == 0:
      kept = sorted(int(d) for d in os.listdir(self.store.directory) if d.isdigit())
      for old in kept[:max(len(kept) - max(self.settings.keep_good, 1), 0)]:
        shutil.rmtree(self.store.step_path(old))
    parallel.sync("good_checkpoints")
    self.store.manager.reload()

  def copy_to_rolling(self, step: int) -> None:
    """Good checkpoint `step` back into the rolling ones (if retention removed it), so that a run killed
    after a rollback resumes from it."""
    rolling = self.context.checkpointer
    dst = rolling.step_path(step)
    if jax.process_index() == 0 and not os.path.exists(dst):
      _link_checkpoint(self.store.step_path(step), dst, self.context.workdir)
    parallel.sync("good_to_rolling")
    rolling.manager.reload()

  def latest(self) -> int | None:
    self.store.manager.reload()
    return self.store.latest_step()

  def restore(self, state: Any, step: int) -> Any:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return self.store.restore(target, step)


class _Signals:
  """SIGTERM / SIGINT set a flag that the loop reads at the next step boundary; a second one interrupts."""
  NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

  def __init__(self, enabled: bool = True):
    self.received, self.previous, self.enabled = None, {}, enabled

  def __enter__(self):
    if self.enabled and threading.current_thread() is threading.main_thread():
      for sig in self.NAMES:
        self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None:        # the second signal: stop now
      signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
      raise KeyboardInterrupt
    self.received = signum
    logging.warning("%s received: checkpointing at the end of this step, then exiting", self.NAMES[signum])

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def _read_guard_record(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, GUARD_RECORD)
  if not os.path.exists(path):
    return {"rollbacks": 0, "lr_scale": 1.0, "events": []}
  with open(path) as f:
    return json.load(f)


def _write_guard_record(workdir: str, record: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, GUARD_RECORD + ".tmp")
    with open(tmp, "w") as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(workdir, GUARD_RECORD))


def run(state: Any, make_step: Callable[[float], Callable[[Any, jax.Array], tuple[Any, dict]]],
        batches_from: Callable[[int], Iterator[np.ndarray]], context: Run, *, total_steps: int,
        actions: Sequence[tuple[int, Callable[[Any, int], Any]]] = (), name: str = "train") -> Any:
  """Steps from `state.step` to `total_steps` and returns the final state.

  - `make_step(lr_scale)` gives `step_fn(state, sharded batch) → (state, metrics)` with the configured
    learning rate times `lr_scale`; `batches_from(step)` the data from `step` on (deterministic).
  - Logs aggregated metrics every `train.log_every_steps` (warning on skipped non-finite updates), runs
    each `(every, action(state, step))` on its cadence, checkpoints every `train.checkpoint_every_steps`
    and at the last step.
  - Divergence guard (`config.guard`): every step's watched metrics are checked (at log and checkpoint
    steps) against their recent history; a checkpoint followed by `guard.confirm_steps` healthy steps is
    copied to `<workdir>/checkpoints_good`. A non-finite or runaway value restores the latest good
    checkpoint, drops the rolling checkpoints after it, multiplies the learning rate by
    `guard.lr_factor` and continues; `guard.max_rollbacks` exceeded → `DivergenceError` naming the last
    good checkpoint. Rollbacks and the learning-rate scale persist in `<workdir>/guard.json`.
  - SIGTERM / SIGINT (or a multi-host preemption notice): checkpoint at the end of the current step, then
    `Preempted`. A rerun of the same command continues exactly (same data order and random numbers).
  """
  t = context.config.train
  settings = GuardSettings.of(context.config)
  record = _read_guard_record(context.workdir)
  guard = Guard(settings) if settings.enabled else None
  good = _GoodCheckpoints(context, settings) if settings.enabled else None
  step_fn = make_step(record["lr_scale"])
  if record["lr_scale"] != 1.0:
    logging.warning("%s: learning rate × %g after %d rollbacks (%s)", name, record["lr_scale"], record["rollbacks"],
                    os.path.join(context.workdir, GUARD_RECORD))
  from clu import periodic_actions
  step = int(state.step)
  batches = batches_from(step)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=context.writer)] \
      if jax.process_index() == 0 else []
  logging.info("%s: steps %d → %d on %d devices", name, step, total_steps, context.mesh.size)
  history, unchecked = [], []          # metrics since the last log step / the last guard check
  previous = None                      # the previous step's metrics
  # Several processes: JAX's preemption service catches SIGTERM and every process learns of it at the
  # same step through `reached_preemption`; a per-process handler would stop them at different steps.
  with _Signals(enabled=jax.process_count() == 1) as signals:
    while step < total_steps:
      step += 1
      with jax.profiler.StepTraceAnnotation(name, step_num=step):
        state, metrics = step_fn(state, context.shard(next(batches)))
      history.append(metrics)
      if guard is not None:
        unchecked.append((step, metrics))
      if previous is not None:          # bound how far dispatch runs ahead (honest steps/s, bounded memory)
        jax.block_until_ready(previous)
      previous = metrics
      for hook in hooks:
        hook(step)
      log_now, save_now = due(step, t.log_every_steps, total_steps), due(step, t.checkpoint_every_steps, total_steps)
      if guard is not None and (log_now or save_now):
        window = jax.device_get(unchecked)
        problem = next(filter(None, (guard.check(s, m) for s, m in window)), None)
        if problem is None and window and all(float(np.asarray(m.get("skipped", 0.0))) >= 1.0 for _, m in window):
          problem = f"steps {window[0][0]}–{window[-1][0]}: every update skipped for a non-finite loss"
        unchecked = []
        if problem is not None:
          state, step = _rollback(state, problem, record, good, context, settings, name)
          # The guard keeps its history: the steps up to the anomaly passed its checks.
          step_fn, batches, history = make_step(record["lr_scale"]), batches_from(step), []
          hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=context.writer)] \
              if jax.process_index() == 0 else []
          continue
        good.confirm_through(step)
      if log_now:
        scalars = aggregate_metrics(history)
        context.writer.write_scalars(step, scalars)
        if scalars.get("train/skipped"):
          logging.warning("step %d: %d updates skipped for a non-finite loss", step, scalars["train/skipped"])
        history = []
      for every, action in actions:
        if due(step, every, total_steps):
          action(state, step)
      if save_now:
        context.checkpointer.save(step, state, context.config)
        if good is not None:
          good.saved(step)
      preempted = signals.received is not None or (
          jax.process_count() > 1 and context.checkpointer.manager.reached_preemption(step))
      if preempted:
        if not save_now:
          context.checkpointer.save(step, state, context.config)
        context.checkpointer.close()
        context.writer.flush()
        raise Preempted(_Signals.NAMES.get(signals.received, "preemption notice"), step,
                        context.checkpointer.directory)
  context.checkpointer.close()
  context.writer.flush()
  return state


def _rollback(state, problem: str, record: dict, good: _GoodCheckpoints, context: Run, settings: GuardSettings,
              name: str):
  """Restores the latest good checkpoint after `problem`; returns (state, step)."""
  last_good = good.latest()
  where = good.store.step_path(last_good) if last_good is not None else None
  record["events"].append({"problem": problem, "restored": last_good})
  if last_good is None:
    _write_guard_record(context.workdir, record)
    raise DivergenceError(f"{name} diverged ({problem}) before any checkpoint was confirmed good; lower "
                          f"--config.optim.learning_rate or raise --config.guard.tolerance")
  if record["rollbacks"] >= settings.max_rollbacks:
    _write_guard_record(context.workdir, record)
    # A rerun (e.g. with a larger guard.max_rollbacks) resumes from the good checkpoint, not the diverged run.
    if jax.process_index() == 0:
      for s in context.checkpointer.all_steps():
        if s > last_good:
          context.checkpointer.quarantine(s, "checkpoints_diverged")
    parallel.sync("diverged")
    good.copy_to_rolling(last_good)
    raise DivergenceError(f"{name} diverged again ({problem}) after {record['rollbacks']} rollbacks "
                          f"(guard.max_rollbacks); last good checkpoint: {where} (step {last_good}); the "
                          f"checkpoints after it are in {os.path.join(context.workdir, 'checkpoints_diverged')}")
  record["rollbacks"] += 1
  record["lr_scale"] *= settings.lr_factor
  restored = good.restore(state, last_good)
  for s in context.checkpointer.all_steps():
    if s > last_good:                    # the diverging trajectory's checkpoints
      context.checkpointer.delete(s)
  good.pending = [s for s in good.pending if s <= last_good]
  good.copy_to_rolling(last_good)
  _write_guard_record(context.workdir, record)
  logging.warning("%s diverged (%s): restored the good checkpoint of step %d, learning rate × %g from now on "
                  "(rollback %d of at most %d)", name, problem, last_good, record["lr_scale"], record["rollbacks"],
                  settings.max_rollbacks)
  return restored, last_good
