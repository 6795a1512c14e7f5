"""Stage 1 of the 2-D experiment: an MLP VAE (2-D latent, Gaussian decoder) on a mixture of 25
Gaussians (means {−4, −2, 0, 2, 4}², std 0.1; `vaebm_jax.data.synthetic`). Trains in about a minute.

COMMAND: python -m vaebm_jax.main --config=configs/gaussians25_vae.py --workdir=workdirs/gaussians25_vae
"""

import ml_collections

from configs import common
from configs.default_vae import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "gaussians25"
  config.data.random_flip = False
  config.model_type = "mlp_vae"
  config.model = ml_collections.ConfigDict(dict(data_dim=2, latent_dim=2, hidden=256, num_layers=3))
  config.train.update(batch_size=500, epochs=-1, num_train_steps=10_000, log_every_steps=500,
                      image_every_steps=0, checkpoint_every_steps=2500, eval_every_steps=2500,
                      num_eval_batches=10, eval_batch_size=1000)
  # steps per epoch = 200: warm-up over 2.5 epochs, then cosine to 1e-4.
  config.optim.update(learning_rate=2e-3, warmup_epochs=2.5, weight_decay=0.0)
  return common.apply_variant(config, arg)
