"""Stage 2 on Fashion-MNIST for this CPU: the small 'mnist' energy net (C d, C, 2C d, 2C; C=32) on
the NVAE of configs/fashion_mnist_vae.py; 10 Langevin steps of η = 8e-5 (16 at test), samples as
negatives, replay buffer (p_max 0.6, anneal 200, 1000 per device: 2000 on this CPU's 2).

COMMAND: python -m vaebm_jax.main --config=configs/fashion_mnist_ebm.py --workdir=workdirs/fashion_mnist_ebm --config.vae_workdir=workdirs/fashion_mnist_vae
SMOKE:   python -m vaebm_jax.main --config=configs/fashion_mnist_ebm.py:smoke --workdir=/tmp/fmnist_ebm_smoke --config.vae_workdir=/tmp/fmnist_smoke
"""

from configs import common
from configs.default_ebm import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "fashion_mnist"
  config.data.random_flip = False
  config.vae_workdir = "workdirs/fashion_mnist_vae"
  config.ebm.update(architecture="mnist", n_channel=32)
  config.train.update(batch_size=32, num_train_steps=400, log_every_steps=20, image_every_steps=100,
                      checkpoint_every_steps=100)
  config.optim.update(learning_rate=5e-5)
  config.objective.update(use_mu_cd=False)
  config.langevin.update(train_steps=10, test_steps=16, step_size=8e-5)
  config.buffer.update(use=True, p_max=0.6, anneal_steps=200, capacity=1000)
  return common.apply_variant(config, arg)
