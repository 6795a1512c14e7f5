"""Stage 1 for CIFAR-10: VAEBM's NVAE (C=128, 1 scale × 30 groups, 1 flow, Gaussian decoder).

130,744,004 parameters, as the reference. Trained on 8 GPUs × 32 for 400 epochs in the reference.

COMMAND: python -m vaebm_jax.main --config=configs/cifar10_vae.py --workdir=workdirs/cifar10_vae
SMOKE:   python -m vaebm_jax.main --config=configs/cifar10_vae.py:smoke --workdir=/tmp/cifar10_vae_smoke
"""

from configs import common
from configs.default_vae import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "cifar10"
  config.model.update(image_size=32, num_channels_enc=128, num_channels_dec=128, num_latent_scales=1,
                      num_groups_per_scale=30, num_nf=1)
  config.train.update(batch_size=256, epochs=400)
  config.objective.weight_decay_norm = 1e-1
  config.optim.warmup_epochs = 5.0
  return common.apply_variant(config, arg)
