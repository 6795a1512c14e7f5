"""Stage 1 on Fashion-MNIST (local IDX files, padded to 32×32×1): a small NVAE for this CPU.

C=32, 2 scales × 2 groups of 8 latent channels, 1 cell per conditional, no flow, Gaussian decoder.
Needs `apt-get install dataset-fashion-mnist` (or --config.data.data_dir=DIR with the IDX files).

COMMAND: python -m vaebm_jax.main --config=configs/fashion_mnist_vae.py --workdir=workdirs/fashion_mnist_vae
SMOKE:   python -m vaebm_jax.main --config=configs/fashion_mnist_vae.py:smoke --workdir=/tmp/fmnist_smoke
"""

from configs import common
from configs.default_vae import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "fashion_mnist"
  config.data.random_flip = False
  config.model.update(image_size=32, image_channels=1, num_channels_enc=32, num_channels_dec=32,
                      num_latent_scales=2, num_groups_per_scale=2, num_latent_per_group=8,
                      num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_preprocess_cells=1,
                      num_postprocess_cells=1, num_nf=0)
  config.train.update(batch_size=64, epochs=2, log_every_steps=50, image_every_steps=625,
                      checkpoint_every_steps=250, eval_every_steps=625, num_eval_batches=40,
                      eval_batch_size=250)
  # Lower lr than the reference's 1e-2 at batch 256: NVAE issue #2 (NaNs with small batches).
  config.optim.update(learning_rate=5e-3, warmup_epochs=0.25)
  config.objective.weight_decay_norm = 1e-2
  # Recompute the cells in the backward pass: on CPU faster and leaner than storing every activation of
  # the scanned groups (experiments/RESULTS.md, issue 10); the same gradients.
  config.model.remat_cells = True
  return common.apply_variant(config, arg)
