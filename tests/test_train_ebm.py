"""Stage 2 end to end: stage-1 smoke → stage-2 smoke → samples, resume, and stage-1 workdir errors."""

import functools
import os
import shutil

import jax
import numpy as np
import pytest

from configs import digits_ebm, digits_vae
from vaebm_jax import evaluate, load_vaebm, sample_fn, train_ebm, train_vae


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  vae_config = digits_vae.get_config("smoke")
  vae_config.train.update(num_train_steps=4, checkpoint_every_steps=4, eval_every_steps=4, image_every_steps=4,
                          batch_size=8, eval_batch_size=8, num_eval_batches=1, num_image_samples=8)
  train_vae.train_and_evaluate(vae_config, str(root / "vae"))
  ebm_config = digits_ebm.get_config("smoke")
  ebm_config.vae_workdir = str(root / "vae")
  state = train_ebm.train_and_evaluate(ebm_config, str(root / "ebm"))
  return root, ebm_config, state


def test_smoke_configs_run_stage1_stage2_and_sampling(workdirs):
  root, config, state = workdirs
  assert int(state.step) == config.train.num_train_steps
  assert state.buffer is not None and int(state.buffer.size) == min(
      config.buffer.size, config.train.num_train_steps * config.train.batch_size)
  images = os.listdir(root / "ebm" / "images")
  assert "vaebm_samples_0000006.png" in images and "vae_samples_0000006.png" in images
  out = evaluate.sample_to_files(str(root / "ebm"), num_samples=6, batch_size=4)
  samples = np.load(os.path.join(out, "samples.npz"))
  assert samples["images"].shape == (6, 16, 16, 1) and samples["uint8"].dtype == np.uint8


def test_load_vaebm_and_sample_fn_in_foreign_code(workdirs):
  root, _, _ = workdirs
  vae, ebm, params, settings = load_vaebm(str(root / "ebm"))
  draw = jax.jit(functools.partial(sample_fn, vae=vae, ebm=ebm, num_samples=4, **settings))
  a = np.asarray(draw(jax.random.key(0), params))
  np.testing.assert_array_equal(a, np.asarray(draw(jax.random.key(0), params)))
  assert a.shape == (4, 16, 16, 1) and np.isfinite(a).all()


def test_resumed_ebm_run_equals_uninterrupted(workdirs):
  root, config, state = workdirs
  shutil.copytree(root / "ebm" / "checkpoints" / "3", root / "ebm_resumed" / "checkpoints" / "3")
  resumed = train_ebm.train_and_evaluate(config, str(root / "ebm_resumed"))
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(resumed)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_missing_or_incompatible_stage1_workdir_is_one_clear_error(workdirs, tmp_path):
  root, config, _ = workdirs
  with pytest.raises(train_ebm.WorkdirError, match="vae_workdir is not set"):
    train_ebm.load_vae(None)
  with pytest.raises(train_ebm.WorkdirError, match="no stage-1 checkpoints .* train the NVAE first"):
    train_ebm.load_vae(str(tmp_path / "nowhere"))
  with pytest.raises(train_ebm.WorkdirError, match="not a stage-1"):
    train_ebm.load_vae(str(root / "ebm"))
  other = config.copy_and_resolve_references()
  other.data.name = "fashion_mnist"
  with pytest.raises(train_ebm.WorkdirError, match="trained on 'digits'"):
    train_ebm.train_and_evaluate(other, str(tmp_path / "w"))
  with pytest.raises(train_ebm.WorkdirError, match="no stage-2 checkpoints"):
    load_vaebm(str(tmp_path / "nothing"))
