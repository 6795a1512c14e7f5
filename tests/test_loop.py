"""The shared step loop (vaebm_jax.loop.run) on a toy model: divergence guard, preemption, and falling back
from an unreadable checkpoint. The stage loops use this loop unchanged (tests/test_import_graph.py)."""

import json
import os
import signal

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from vaebm_jax import checkpoint, loop


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  w: jax.Array


def _config(**guard):
  config = ml_collections.ConfigDict()
  config.train = ml_collections.ConfigDict(dict(batch_size=4, log_every_steps=5, checkpoint_every_steps=5,
                                                keep_checkpoints=2))
  config.guard = common.guard_config("loss,grad_norm", keep_good=2)   # confirmed after one interval (5)
  config.guard.update(window=20, min_history=10, **guard)
  return config


def _batches_from(step):
  """Deterministic data by step, as the stage datasets are."""
  while True:
    step += 1
    yield np.full((4, 1), np.sin(step), np.float32)


def _make_step(explode_at=(), lr=0.1, calls=None, on_step=None):
  """w ← w − lr·lr_scale·(w − mean(batch)); its loss runs away at the steps in `explode_at` while the
  learning rate is the configured one (a step that diverges until the guard lowers it)."""
  def make_step(lr_scale):
    if calls is not None:
      calls.append(lr_scale)

    @jax.jit
    def step_fn(state, batch):
      grad = state.w - jnp.mean(batch)
      loss = 0.5 * grad ** 2
      blown = (lr_scale == 1.0) & jnp.isin(state.step + 1, jnp.asarray(explode_at or [-1]))
      loss = jnp.where(blown, 1e6, loss)
      return ToyState(state.step + 1, state.w - lr * lr_scale * grad), {"loss": loss, "grad_norm": jnp.abs(grad)}

    if on_step is None:
      return step_fn

    def with_hook(state, batch):
      on_step(int(state.step) + 1)
      return step_fn(state, batch)
    return with_hook
  return make_step


def _init():
  return ToyState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32))


def _run(workdir, config, make_step, total=60):
  context = loop.start(config, str(workdir))
  state = context.checkpointer.restore_or_initialize(_init, sharding=context.replicated)
  return loop.run(state, make_step, _batches_from, context, total_steps=total, name="toy")


def test_injected_divergence_is_rolled_back_and_good_checkpoints_survive_retention(tmp_path):
  calls = []
  final = _run(tmp_path, _config(), _make_step(explode_at=[42], calls=calls))
  assert int(final.step) == 60 and np.isfinite(float(final.w))
  record = json.loads((tmp_path / loop.GUARD_RECORD).read_text())
  assert record["rollbacks"] == 1 and record["lr_scale"] == 0.5 and calls == [1.0, 0.5]
  # The runaway at step 42 was seen at the check of step 45; the last checkpoint confirmed good then was
  # step 35 (checkpoint 40 had not had its 5 healthy steps yet).
  assert record["events"][0]["restored"] == 35 and "step 42: loss" in record["events"][0]["problem"]
  # Rolling retention (2) kept only the last two; the good ones are kept apart (keep_good = 2).
  assert checkpoint.Checkpointer(str(tmp_path), max_to_keep=None).all_steps() == [55, 60]
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints_good")) == [50, 55]

  # The rolled-back run equals a run that used the lower learning rate from step 35 on.
  reference = _run(tmp_path / "ref_a", _config(enabled=False), _make_step(), total=35)
  ref_dir = tmp_path / "ref_a"
  lowered = _run(ref_dir, _config(enabled=False), lambda s: _make_step()(0.5), total=60)
  assert int(reference.step) == 35
  np.testing.assert_array_equal(final.w, lowered.w)


def test_skipped_updates_are_not_judged_but_a_window_of_them_is_a_divergence(tmp_path):
  def make_step(lr_scale, skip=lambda step: step == 23):
    inner = _make_step()(lr_scale)

    def step_fn(state, batch):
      new, metrics = inner(state, batch)
      skipped = (lr_scale == 1.0) & skip(new.step)
      metrics = dict(metrics, loss=jnp.where(skipped, jnp.nan, metrics["loss"]), skipped=skipped.astype(jnp.float32))
      return jax.tree.map(lambda a, b: jnp.where(skipped, b, a), new, state.replace(step=new.step)), metrics
    return step_fn

  final = _run(tmp_path / "one", _config(), make_step, total=30)     # one skipped update: no rollback
  assert int(final.step) == 30 and not (tmp_path / "one" / loop.GUARD_RECORD).exists()
  final = _run(tmp_path / "all", _config(), lambda s: make_step(s, lambda step: step > 20), total=30)
  record = json.loads((tmp_path / "all" / loop.GUARD_RECORD).read_text())
  assert record["rollbacks"] == 1 and "every update skipped" in record["events"][0]["problem"]


def test_non_finite_metric_triggers_the_guard_too(tmp_path):
  def make_step(lr_scale):
    inner = _make_step()(lr_scale)

    def step_fn(state, batch):
      state, metrics = inner(state, batch)
      bad = (lr_scale == 1.0) & (state.step == 23)
      return state, dict(metrics, grad_norm=jnp.where(bad, jnp.nan, metrics["grad_norm"]))
    return step_fn

  final = _run(tmp_path, _config(), make_step, total=30)
  record = json.loads((tmp_path / loop.GUARD_RECORD).read_text())
  assert int(final.step) == 30 and record["rollbacks"] == 1 and "grad_norm = nan" in record["events"][0]["problem"]


def test_too_many_rollbacks_stop_with_the_last_good_checkpoint(tmp_path):
  def make_step(lr_scale):                    # diverges at step 28 whatever the learning rate
    inner = _make_step()(lr_scale)

    def step_fn(state, batch):
      state, metrics = inner(state, batch)
      return state, dict(metrics, loss=jnp.where(state.step == 28, 1e9, metrics["loss"]))
    return step_fn

  with pytest.raises(loop.DivergenceError, match=r"after 2 rollbacks .*checkpoints_good/20 \(step 20\)"):
    _run(tmp_path, _config(max_rollbacks=2), make_step, total=40)
  record = json.loads((tmp_path / loop.GUARD_RECORD).read_text())
  assert record["rollbacks"] == 2 and record["lr_scale"] == 0.25
  # A rerun resumes from the good checkpoint; the diverged run's checkpoints are kept aside.
  assert checkpoint.Checkpointer(str(tmp_path), max_to_keep=None).all_steps()[-1] == 20
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints_diverged")) == [25]
  # The state the user is told about is there and restorable.
  restored = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None, subdir="checkpoints_good").restore(
      jax.eval_shape(_init), 20)
  assert int(restored.step) == 20


def test_sigterm_checkpoints_at_the_step_boundary_and_the_rerun_continues_exactly(tmp_path):
  uninterrupted = _run(tmp_path / "full", _config(), _make_step(), total=30)

  def send_sigterm(step):
    if step == 13:
      os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.Preempted, match="SIGTERM at step 13"):
    _run(tmp_path / "cut", _config(), _make_step(on_step=send_sigterm), total=30)
  assert checkpoint.Checkpointer(str(tmp_path / "cut"), max_to_keep=None).latest_step() == 13
  assert signal.getsignal(signal.SIGTERM) is before                # handlers restored
  resumed = _run(tmp_path / "cut", _config(), _make_step(), total=30)
  assert int(resumed.step) == 30
  np.testing.assert_array_equal(resumed.w, uninterrupted.w)


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
  _run(tmp_path, _config(enabled=False), _make_step(), total=10)
  ckpt_dir = tmp_path / "checkpoints" / "10" / "state"
  for f in ckpt_dir.rglob("*"):               # truncate every file of the latest state: a torn write
    if f.is_file():
      f.write_bytes(b"")
  context = loop.start(_config(), str(tmp_path))
  with caplog.at_level("WARNING"):
    state = context.checkpointer.restore_or_initialize(_init, sharding=context.replicated)
  context.checkpointer.close()
  assert int(state.step) == 5
  assert "checkpoint 10" in caplog.text and "unreadable" in caplog.text
  assert (tmp_path / "checkpoints_unreadable" / "10").is_dir()      # kept for inspection, not deleted
  assert not (tmp_path / "checkpoints" / "10").exists()


def test_a_checkpoint_of_another_shape_is_refused_not_moved(tmp_path):
  _run(tmp_path, _config(enabled=False), _make_step(), total=5)
  context = loop.start(_config(), str(tmp_path))
  other = lambda: ToyState(jnp.zeros((), jnp.int32), jnp.ones((3,), jnp.float32))   # e.g. another device count
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"checkpoint 5 .*\(w has shape \(\), this run needs"):
    context.checkpointer.restore_or_initialize(other, sharding=context.replicated)
  fewer = lambda: {"step": jnp.zeros((), jnp.int32)}       # e.g. a run without the replay buffer
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"it holds w, which this run has not"):
    context.checkpointer.restore_or_initialize(fewer, sharding=context.replicated)
  context.checkpointer.close()
  assert (tmp_path / "checkpoints" / "5").is_dir() and not (tmp_path / "checkpoints_unreadable").exists()


def test_saving_a_replicated_state_compiles_nothing_and_restores_it(tmp_path, caplog):
  """One process writes each replicated array whole: orbax's replica-parallel default slices every array
  per device, one eager slice (and a compile per shape) each, for no gain on one host."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {f"w{i}": jax.device_put(np.arange(8 * (i + 1), dtype=np.float32).reshape(8, i + 1), replicated)
           for i in range(5)}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with caplog.at_level("WARNING"), jax.log_compiles():
    ckpt.save(1, state, _config())
    ckpt.wait()
  assert len(jax.devices()) == 4
  assert "Compiling" not in caplog.text, caplog.text
  restored = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state))
  ckpt.close()
  for key in state:
    np.testing.assert_array_equal(restored[key], state[key])


def test_update_if_finite_updates_in_place_and_skips_non_finite_gradients():
  """The optimiser step under the finite guard: the same numbers as the update itself, nothing changed for
  a non-finite gradient, and, with the state donated, no copy of the parameters or moments first (what a
  select of old and new made XLA:CPU do, four times slower for the CIFAR-10 NVAE: experiments/RESULTS.md)."""
  import optax

  from vaebm_jax import optim
  tx = optim.nvae_optimizer(1e-2)
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(64, 96)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)}
  grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
  opt_state = tx.init(params)
  opt_state = tx.update(grads, opt_state, params)[1]              # moments that are not zero

  def guarded(params, opt_state, grads):
    finite = jnp.isfinite(optax.tree.norm(grads))
    return loop.update_if_finite(finite, tx, grads, params, opt_state)

  updates, want_opt = tx.update(grads, opt_state, params)
  want = (optax.apply_updates(params, updates), want_opt)
  got = jax.jit(guarded)(params, opt_state, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  bad = dict(grads, b=grads["b"].at[0, 0, 0, 0].set(jnp.inf))
  jax.tree.map(np.testing.assert_array_equal, jax.jit(guarded)(params, opt_state, bad), (params, opt_state))

  hlo = jax.jit(guarded, donate_argnums=(0, 1)).lower(params, opt_state, grads).compile().as_text()
  copies = [line for line in hlo.splitlines()
            if " copy(" in line and ("f32[64,96]" in line or "f32[3,3,32,32]" in line)]
  assert not copies, copies
