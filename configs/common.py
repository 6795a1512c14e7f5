"""What every config file shares: the eval section, and the variants (`--config=configs/X.py:smoke`)."""

import ml_collections


def eval_config() -> ml_collections.ConfigDict:
  """The `eval` section of every stage-1 and stage-2 config (--mode=eval, vaebm_jax.evaluate.evaluate)."""
  ev = ml_collections.ConfigDict()
  ev.seed = 0
  ev.step = ml_collections.config_dict.placeholder(int)   # checkpoint to evaluate; default the latest
  ev.num_samples = 10_000          # samples for FID / mode counting (0: likelihoods only)
  ev.batch_size = 500
  ev.num_test = 10_000             # test examples for the likelihood (and the small datasets' FID reference)
  ev.iw_samples = 100              # K of the importance-weighted log p(x)
  ev.iw_chunk = 10
  ev.normalize = "clip"            # clip | minmax (the reference's per-image rescale) before the metrics
  ev.inception_weights = ml_collections.config_dict.placeholder(str)   # .npz from metrics.convert_inception
  ev.fid_reference = ml_collections.config_dict.placeholder(str)       # .npz with mu, sigma (e.g. TTUR's)
  return ev


def guard_config(metrics: str, keep_good: int, confirm_steps: int = -1) -> ml_collections.ConfigDict:
  """The `guard` section of both stages (vaebm_jax.loop.run's divergence guard)."""
  g = ml_collections.ConfigDict()
  g.enabled = True
  g.metrics = metrics                # per-step metrics checked against their own recent history
  g.window = 500                     # steps of history
  g.min_history = 100                # runaway checks start after this many steps (non-finite: always)
  g.tolerance = 25.0                 # runaway: |x − median| > tolerance × max(1.4826·MAD, 1 % of |median|)
  g.confirm_steps = confirm_steps    # healthy steps after a checkpoint before it counts as good (−1: one
                                     # checkpoint interval, train.checkpoint_every_steps)
  g.keep_good = keep_good            # good checkpoints kept apart from the rolling ones
  g.lr_factor = 0.5                  # learning rate × this after each rollback
  g.max_rollbacks = 3                # then stop, naming the last good checkpoint
  return g


def apply_variant(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies a comma-separated list of variants. `smoke`: a run of a few steps on a tiny model."""
  for variant in filter(None, (arg or "").split(",")):
    if variant == "smoke" and config.stage == "ebm":
      config.ebm.update(n_channel=32 if config.ebm.architecture == "mlp" else 8, data_init_batches=1)
      config.train.update(batch_size=8, num_train_steps=6, log_every_steps=2, image_every_steps=6,
                          checkpoint_every_steps=3, num_image_samples=8)
      config.langevin.update(train_steps=2, test_steps=3)
      config.buffer.update(capacity=32, anneal_steps=4)
      config.sample.update(num_samples=8, batch_size=4)
    elif variant == "smoke" and config.get("model_type") == "mlp_vae":
      config.model.update(hidden=32, num_layers=2)
      config.train.update(batch_size=64, num_train_steps=40, log_every_steps=10, checkpoint_every_steps=20,
                          eval_every_steps=20, num_eval_batches=2, eval_batch_size=100)
    elif variant == "smoke":
      m = config.model
      scales = min(m.num_latent_scales, 2)   # a hierarchy of two groups at least, one per scale if it can
      m.update(num_channels_enc=8, num_channels_dec=8, num_groups_per_scale=1 if scales > 1 else 2,
               num_latent_scales=scales, num_latent_per_group=4,
               num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_preprocess_cells=1,
               num_postprocess_cells=1, num_nf=min(m.num_nf, 1))
      config.train.update(batch_size=16, num_train_steps=8, log_every_steps=4, image_every_steps=8,
                          checkpoint_every_steps=4, eval_every_steps=8, num_eval_batches=2,
                          eval_batch_size=32, num_image_samples=16)
      config.optim.warmup_epochs = min(config.optim.warmup_epochs, 0.1)
    else:
      raise ValueError(f"unknown config variant {variant!r}; known: smoke")
    if variant == "smoke":
      config.eval.update(num_samples=16, batch_size=8, num_test=16, iw_samples=4, iw_chunk=2)
  return config
