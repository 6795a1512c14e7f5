"""Stage 2 end to end: stage-1 smoke → stage-2 smoke → samples, resume, and stage-1 workdir errors."""

import functools
import os
import shutil

import jax
import numpy as np
import pytest

from configs import digits_ebm, digits_vae
from vaebm_jax import checkpoint, evaluate, load_vaebm, sample_fn, train_ebm, train_vae, workdir

pytestmark = pytest.mark.slow   # stage-1 + stage-2 smoke runs


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
  shards = jax.device_count()                 # one buffer per device, each fed by its own chains
  assert state.buffer is not None and state.buffer.size.shape == (shards,)
  assert (np.asarray(state.buffer.size) == min(
      config.buffer.capacity, config.train.num_train_steps * config.train.batch_size // shards)).all()
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
  with pytest.raises(workdir.WorkdirError, match="vae_workdir is not set"):
    workdir.load_vae(None)
  with pytest.raises(workdir.WorkdirError, match="no stage-1 checkpoints .* train the NVAE first"):
    workdir.load_vae(str(tmp_path / "nowhere"))
  with pytest.raises(workdir.WorkdirError, match="not a stage-1"):
    workdir.load_vae(str(root / "ebm"))
  with pytest.raises(workdir.WorkdirError, match="no checkpoint at step 5; it has steps \\[3, 6\\]"):
    load_vaebm(str(root / "ebm"), step=5)
  other = config.copy_and_resolve_references()
  other.data.name = "fashion_mnist"
  with pytest.raises(workdir.WorkdirError, match="trained on 'digits'"):
    train_ebm.train_and_evaluate(other, str(tmp_path / "w"))
  with pytest.raises(workdir.WorkdirError, match="no stage-2 checkpoints"):
    load_vaebm(str(tmp_path / "nothing"))


def test_pixel_space_negatives_train_the_same_loop(workdirs, tmp_path):
  root, config, _ = workdirs
  for init in ("vae_mean", "noise"):
    pixel = config.copy_and_resolve_references()
    pixel.langevin.update(space="pixel", pixel_init=init, step_size=1e-2, noise_scale=0.1)
    pixel.buffer.use = False
    pixel.train.update(num_train_steps=2, checkpoint_every_steps=2, image_every_steps=2)
    state = train_ebm.train_and_evaluate(pixel, str(tmp_path / init))
    assert int(state.step) == 2 and state.buffer is None
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    images = evaluate.draw_samples(str(tmp_path / init), 4, 4, progress=False)
    assert images.shape == (4, 16, 16, 1)
  with_buffer = pixel.copy_and_resolve_references()
  with_buffer.buffer.use = True
  with pytest.raises(workdir.WorkdirError, match="buffer holds ε_z"):
    train_ebm.train_and_evaluate(with_buffer, str(tmp_path / "buffer"))


def test_sample_export_minmax_and_chosen_step(workdirs):
  root, _, _ = workdirs
  out = evaluate.sample_to_files(str(root / "ebm"), num_samples=4, batch_size=4, step=3, normalize="minmax")
  assert out.endswith("samples_3")
  samples = np.load(os.path.join(out, "samples.npz"))
  raw = samples["images"]
  per_image = (raw - raw.min(axis=(1, 2, 3), keepdims=True)) / np.maximum(
      raw.max(axis=(1, 2, 3), keepdims=True) - raw.min(axis=(1, 2, 3), keepdims=True), 1e-5)
  np.testing.assert_array_equal(samples["uint8"], np.clip(per_image * 255 + 0.5, 0, 255).astype(np.uint8))
  assert samples["uint8"].min() == 0 and samples["uint8"].max() == 255
  np.testing.assert_array_equal(evaluate.draw_samples(str(root / "ebm"), 4, 4, step=3, progress=False), raw)
  latest = evaluate.draw_samples(str(root / "ebm"), 4, 4, progress=False)
  assert not np.array_equal(latest, raw)              # step 3 and the latest step 6 are different EBMs


def test_draw_samples_resumes_from_its_cache(workdirs, tmp_path):
  root, _, _ = workdirs
  plain = evaluate.draw_samples(str(root / "ebm"), 6, 2, step=3, progress=False)
  cache = str(tmp_path / "cache")
  np.testing.assert_array_equal(evaluate.draw_samples(str(root / "ebm"), 6, 2, step=3, progress=False,
                                                      cache_dir=cache), plain)
  (folder,) = os.listdir(cache)
  batches = sorted(os.listdir(os.path.join(cache, folder)))
  assert batches == ["00000.npy", "00001.npy", "00002.npy"]
  os.remove(os.path.join(cache, folder, "00001.npy"))                   # interrupted before batch 1 was kept
  np.save(os.path.join(cache, folder, "00002.npy"), np.zeros_like(plain[4:]))   # a kept batch is read, not redrawn
  resumed = evaluate.draw_samples(str(root / "ebm"), 6, 2, step=3, progress=False, cache_dir=cache)
  np.testing.assert_array_equal(resumed[:4], plain[:4])
  assert not resumed[4:].any()
  evaluate.draw_samples(str(root / "ebm"), 2, 2, progress=False, cache_dir=cache)   # other parameters: own folder
  assert len(os.listdir(cache)) == 2


def test_vae_remat_cells_gives_the_same_langevin_gradient(workdirs):
  from vaebm_jax import parallel, sampling
  root, config, state = workdirs
  remat = config.copy_and_resolve_references()
  remat.vae_remat_cells = True
  grads = []
  for cfg in (config, remat):
    vae, variables, vae_config, _ = workdir.load_stage1_of(str(root / "ebm"), cfg)
    assert vae_config.model.remat_cells             # stage 1 trained with remat (digits_vae); stage 2 decides
    assert vae.remat_cells == cfg.vae_remat_cells
    ebm = workdir.create_ebm(cfg)
    params = {"vae": variables, "ebm": {"params": state.params}}
    eps = sampling.initial_noise(jax.random.key(3), vae, 4)
    grad = jax.jit(jax.grad(lambda e: sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm)[0].sum()),
                   compiler_options=parallel.compiler_options_for(vae))
    grads.append(jax.device_get(grad(eps)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)


def test_eval_mode_on_stage1_and_stage2_workdirs(workdirs):
  root, config, _ = workdirs
  ev = config.eval
  for stage in ("vae", "ebm"):
    metrics = evaluate.evaluate(str(root / stage), ev)
    assert np.isfinite(metrics["test_log_px"]) and metrics["num_test"] == ev.num_test
    assert metrics["vae"]["classifier_fid"] > 0
    assert os.path.exists(root / stage / "eval" / f"metrics_{metrics['step']}.json")
  assert "vaebm" in metrics and np.isfinite(metrics["test_log_h_unnormalized"])


def test_stage2_loads_exactly_the_stage1_checkpoint_it_was_trained_on(workdirs, tmp_path):
  root, config, _ = workdirs
  record = workdir.read_stage1_record(str(root / "ebm"))
  assert record["path"] == str(root / "vae") and record["step"] == 4 and len(record["fingerprint"]) == 16
  # stage 1 goes on after stage 2 started: a later stage-1 checkpoint with other weights appears
  vae_dir = tmp_path / "vae"
  shutil.copytree(root / "vae", vae_dir)
  _, variables, vae_config, _ = workdir.load_vae(str(vae_dir))
  ckpt = checkpoint.Checkpointer(str(vae_dir), max_to_keep=None)
  ckpt.save(8, {"params": jax.tree.map(lambda p: p + 1.0, variables["params"]),
                "batch_stats": variables["batch_stats"]}, vae_config)
  ckpt.close()
  ebm_dir = tmp_path / "ebm"
  shutil.copytree(root / "ebm", ebm_dir)
  workdir.write_stage1_record(str(ebm_dir), dict(record, path=str(vae_dir)))
  _, _, params, _ = load_vaebm(str(ebm_dir))
  recorded = workdir.load_vae(str(vae_dir), step=4, scan_groups=config.vae_scan_groups)[1]
  for a, b in zip(jax.tree.leaves(params["vae"]), jax.tree.leaves(recorded), strict=True):
    np.testing.assert_array_equal(a, b)
  # a stage-1 workdir whose recorded checkpoint is another architecture is refused
  workdir.write_stage1_record(str(ebm_dir), dict(record, path=str(vae_dir), fingerprint="0" * 16))
  with pytest.raises(workdir.WorkdirError, match="is not the one .* was trained on"):
    load_vaebm(str(ebm_dir))
  # a recorded stage-1 workdir that has moved is found through the run's config.vae_workdir
  workdir.write_stage1_record(str(ebm_dir), dict(record, path=str(tmp_path / "moved")))
  _, _, params, _ = load_vaebm(str(ebm_dir))
  for a, b in zip(jax.tree.leaves(params["vae"]), jax.tree.leaves(recorded), strict=True):
    np.testing.assert_array_equal(a, b)


def test_loading_reads_parameters_and_bn_statistics_only(workdirs):
  root, _, _ = workdirs
  ckpt = checkpoint.Checkpointer(str(root / "ebm"), max_to_keep=None, read_only=True)
  _, ebm, params, _ = load_vaebm(str(root / "ebm"))
  restored = ckpt.restore_items(6, {"params": params["ebm"]})
  assert set(restored) == {"params"}                     # not opt_state, spectral or the replay buffer
  assert set(params["vae"]) == {"params", "batch_stats"}
  ckpt.close()
