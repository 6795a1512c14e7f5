"""Quickstart: a tiny NVAE on scikit-learn's bundled 8×8 digits (upsampled ×2 to 16×16×1).

Needs nothing beyond the install and trains in a few minutes on a laptop CPU, writing sample grids.

COMMAND: python -m vaebm_jax.main --config=configs/digits_vae.py --workdir=workdirs/digits_vae
"""

from configs import common
from configs.default_vae import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "digits"
  config.data.random_flip = False
  config.model.update(image_size=16, image_channels=1, num_channels_enc=16, num_channels_dec=16,
                      num_latent_scales=2, num_groups_per_scale=1, num_latent_per_group=8,
                      num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_preprocess_cells=1,
                      num_postprocess_cells=1, num_nf=0)
  config.train.update(batch_size=64, epochs=40, log_every_steps=50, image_every_steps=300,
                      checkpoint_every_steps=300, eval_every_steps=300, num_eval_batches=4,
                      eval_batch_size=64)
  config.optim.update(learning_rate=5e-3, warmup_epochs=1.0)
  config.objective.weight_decay_norm = 1e-2
  # Recompute the cells in the backward pass: on CPU faster and leaner than storing every activation of
  # the scanned groups (experiments/RESULTS.md, issue 10); the same gradients.
  config.model.remat_cells = True
  return common.apply_variant(config, arg)
