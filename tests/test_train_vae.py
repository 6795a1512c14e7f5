"""The stage-1 loop: it learns, resumes exactly, and is the same on 1 and 4 devices."""

import functools
import os
import shutil

import jax
import numpy as np
import pytest

from configs import digits_vae
from vaebm_jax import checkpoint, data, objectives, parallel, train_vae

pytestmark = pytest.mark.slow   # compiles and runs the stage-1 step and loop


def small_config(steps=4):
  config = digits_vae.get_config("smoke")
  config.train.update(batch_size=8, num_train_steps=steps, log_every_steps=2, checkpoint_every_steps=2,
                      eval_every_steps=steps, image_every_steps=steps, num_eval_batches=1, eval_batch_size=8,
                      num_image_samples=8)
  return config


def make_step(config, mesh, total_steps):
  model = train_vae.create_model(config)
  tx, schedule = train_vae.create_optimizer(config, steps_per_epoch=10, epochs=max(total_steps // 10, 1))
  alpha = objectives.kl_balancer_coefficients(model.groups)
  repl, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  state = jax.jit(functools.partial(train_vae.create_train_state, model, tx, image_shape=(16, 16, 1)),
                  out_shardings=repl)(jax.random.key(0))
  step = jax.jit(functools.partial(train_vae.train_step, model=model, tx=tx, schedule=schedule,
                                   settings=train_vae.StepSettings.of(config), total_steps=total_steps, alpha=alpha),
                 in_shardings=(repl, sharded, repl), out_shardings=(repl, repl))
  return state, step


def digits_batch(n=8):
  ds = data.create_dataset("digits", "train", image_size=16, image_channels=1, global_batch_size=n, train=True)
  return ds.batches[0]


@pytest.fixture(scope="module")
def step_on_all_devices():
  """One compiled step on all 4 devices, shared by the tests below (compiling is most of their time)."""
  mesh = parallel.create_mesh()
  state, step = make_step(small_config(), mesh, total_steps=300)
  return mesh, state, step


def test_training_drives_nelbo_down_on_a_small_batch(step_on_all_devices):
  mesh, state, step = step_on_all_devices
  batch = parallel.shard_batch(digits_batch(), mesh)
  nelbos = []
  for _ in range(300):
    state, metrics = step(state, batch, jax.random.key(1))
    nelbos.append(float(metrics["nelbo"]))
  assert np.isfinite(nelbos).all()
  assert np.mean(nelbos[-10:]) < 0.6 * np.mean(nelbos[:10]), (nelbos[:10], nelbos[-10:])


def test_step_on_four_devices_equals_step_on_one(step_on_all_devices):
  batch = digits_batch()
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    if len(devices) == 4:
      mesh, state, step = step_on_all_devices
    else:
      mesh = parallel.create_mesh(devices)
      state, step = make_step(small_config(), mesh, total_steps=300)
    for _ in range(2):
      state, metrics = step(state, parallel.shard_batch(batch, mesh), jax.random.key(1))
    results.append((jax.device_get(state.params), jax.device_get(state.batch_stats), float(metrics["loss"])))
  assert len(jax.devices()) == 4
  np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][:2]), jax.tree.leaves(results[1][:2]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_non_finite_loss_skips_the_update(step_on_all_devices):
  mesh, state, step = step_on_all_devices
  before = jax.device_get(state)
  bad = digits_batch().copy()
  bad[0, 0, 0, 0] = np.nan
  after, metrics = step(state, parallel.shard_batch(bad, mesh), jax.random.key(1))
  assert float(metrics["skipped"]) == 1.0
  assert int(after.step) == 1
  for a, b in zip(jax.tree.leaves((before.params, before.batch_stats, before.opt_state)),
                  jax.tree.leaves(jax.device_get((after.params, after.batch_stats, after.opt_state))), strict=True):
    np.testing.assert_array_equal(a, b)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
  config = small_config(steps=4)
  full = train_vae.train_and_evaluate(config, str(tmp_path / "full"))
  # An interrupted run: it had written the checkpoint of step 2 when it was killed.
  shutil.copytree(tmp_path / "full" / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
  assert checkpoint.Checkpointer(str(tmp_path / "resumed")).latest_step() == 2
  resumed = train_vae.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == int(full.step) == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(full)), jax.tree.leaves(jax.device_get(resumed)), strict=True):
    np.testing.assert_array_equal(a, b)
  # and the run left what a researcher looks at
  files = os.listdir(tmp_path / "full")
  assert any(f.startswith("events.out.tfevents") for f in files)
  assert {"reconstructions_0000004.png", "samples_t1.0_0000004.png", "samples_t0.7_0000004.png"} <= set(
      os.listdir(tmp_path / "full" / "images"))
  config_back = checkpoint.Checkpointer(str(tmp_path / "full")).restore_config()
  assert config_back.model.num_channels_enc == config.model.num_channels_enc


def test_batch_not_divisible_by_devices_is_one_clear_error():
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    parallel.check_batch_size(6, parallel.create_mesh())
