"""Stage 1 for LSUN Church 64: VAEBM's NVAE (C=48, 3 scales × 5 groups, 1 flow, Gaussian decoder).

8 GPUs × 32, 60 epochs, 1 warm-up epoch.

COMMAND: python -m vaebm_jax.main --config=configs/lsun_church64_vae.py --workdir=workdirs/lsun_church64_vae
"""

from configs import common
from configs.default_vae import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "lsun_church64"
  config.model.update(image_size=64, num_channels_enc=48, num_channels_dec=48, num_latent_scales=3,
                      num_groups_per_scale=5, num_nf=1)
  config.train.update(batch_size=256, epochs=60)
  config.objective.weight_decay_norm = 1e-1
  config.optim.warmup_epochs = 1.0
  return common.apply_variant(config, arg)
