"""Quickstart stage 2: a tiny energy net on the digits NVAE of configs/digits_vae.py.

COMMAND: python -m vaebm_jax.main --config=configs/digits_ebm.py --workdir=workdirs/digits_ebm --config.vae_workdir=workdirs/digits_vae
"""

from configs import common
from configs.default_ebm import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "digits"
  config.data.random_flip = False
  config.vae_workdir = "workdirs/digits_vae"
  config.ebm.update(architecture="mnist", n_channel=16, data_init_batches=2)
  config.train.update(batch_size=32, num_train_steps=200, log_every_steps=20, image_every_steps=100,
                      checkpoint_every_steps=100, num_image_samples=36)
  # 2e-5: at 5e-5 the energies ran away from about step 80 (chain energies −190 → −1,500 by step 160,
  # 10× in 200 steps), and the divergence guard stopped the quickstart at step 167 (2026-11-27,
  # experiments/RESULTS.md); at 2e-5 they went −190 → −263 over the 200 steps, E⁺ − E⁻ still falling.
  config.optim.update(learning_rate=2e-5)
  config.langevin.update(train_steps=10, test_steps=16, step_size=8e-5)
  config.buffer.update(use=True, p_max=0.6, anneal_steps=100, capacity=500)   # per device: 1000 on 2
  return common.apply_variant(config, arg)
