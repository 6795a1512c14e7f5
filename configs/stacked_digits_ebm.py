"""Stage 2 of the mode-coverage experiment: the small energy net on the stacked-digits NVAE of
configs/stacked_digits_vae.py; 10 ε-space Langevin steps of η = 8e-5 (16 at test), replay buffer.

COMMAND: python -m vaebm_jax.main --config=configs/stacked_digits_ebm.py --workdir=workdirs/stacked_digits_ebm --config.vae_workdir=workdirs/stacked_digits_vae
"""

from configs import common
from configs.default_ebm import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "stacked_digits"
  config.data.random_flip = False
  config.vae_workdir = "workdirs/stacked_digits_vae"
  config.ebm.update(architecture="mnist", n_channel=16, data_init_batches=2)
  config.train.update(batch_size=32, num_train_steps=300, log_every_steps=20, image_every_steps=100,
                      checkpoint_every_steps=100, num_image_samples=36)
  config.optim.update(learning_rate=5e-5)
  config.langevin.update(train_steps=10, test_steps=16, step_size=8e-5)
  config.buffer.update(use=True, p_max=0.6, anneal_steps=100, capacity=500)   # per device: 1000 on 2
  config.sample.update(num_samples=10_000, batch_size=500)
  return common.apply_variant(config, arg)
