"""Stage 2 for CIFAR-10: C=128, batch 32, lr 4e-5, 30k iterations, 10 Langevin steps of η = 8e-5 (16 at test), samples as negatives, no buffer (the README command omits --use_buffer).

The reference's values (VAEBM_SPEC.md §3.4). Needs a finished stage-1 run of the same dataset.

COMMAND: python -m vaebm_jax.main --config=configs/cifar10_ebm.py --workdir=workdirs/cifar10_ebm --config.vae_workdir=workdirs/cifar10_vae
SAMPLE:  python -m vaebm_jax.main --config=configs/cifar10_ebm.py --workdir=workdirs/cifar10_ebm --mode=sample
"""

from configs import common
from configs.default_ebm import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "cifar10"
  config.vae_workdir = "workdirs/cifar10_vae"
  config.ebm.update(architecture="cifar10", n_channel=128, data_init=True)
  config.train.update(batch_size=32, num_train_steps=30000)
  config.optim.update(learning_rate=4e-5)
  config.objective.update(alpha_s=0.2, use_mu_cd=False)
  config.langevin.update(train_steps=10, test_steps=16, step_size=8e-5)
  config.buffer.update(use=False, p_max=0.6, anneal_steps=5000, capacity=10000)
  return common.apply_variant(config, arg)
