"""Stage 1 for CelebA-HQ 256: VAEBM's NVAE (C=32, 5 scales × 4 groups, 2 flows, Gaussian decoder,
5-bit images, λ annealed from 10 to 1e-2, lr 6e-3). 8 GPUs × 8, 200 epochs.

COMMAND: python -m vaebm_jax.main --config=configs/celebahq256_vae.py --workdir=workdirs/celebahq256_vae
"""

from configs import common
from configs.default_vae import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "celebahq256"
  config.data.random_flip = True
  config.model.update(image_size=256, num_channels_enc=32, num_channels_dec=32, num_latent_scales=5,
                      num_groups_per_scale=4, num_nf=2, num_x_bits=5)
  config.train.update(batch_size=64, epochs=200)
  config.optim.learning_rate = 6e-3
  config.objective.update(weight_decay_norm=1e-2, weight_decay_norm_init=10.0, weight_decay_norm_anneal=True)
  return common.apply_variant(config, arg)
