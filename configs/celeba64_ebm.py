"""Stage 2 for CelebA 64: C=64, batch 32, lr 5e-5, 30k iterations, 10 Langevin steps of η = 5e-6 (20 at test), decoder means as negatives (use_mu_cd), no buffer.

The reference's values (VAEBM_SPEC.md §3.4). Needs a finished stage-1 run of the same dataset.

COMMAND: python -m vaebm_jax.main --config=configs/celeba64_ebm.py --workdir=workdirs/celeba64_ebm --config.vae_workdir=workdirs/celeba64_vae
SAMPLE:  python -m vaebm_jax.main --config=configs/celeba64_ebm.py --workdir=workdirs/celeba64_ebm --mode=sample
"""

from configs import common
from configs.default_ebm import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "celeba64"
  config.vae_workdir = "workdirs/celeba64_vae"
  config.ebm.update(architecture="celeba64", n_channel=64, data_init=True)
  config.train.update(batch_size=32, num_train_steps=30000)
  config.optim.update(learning_rate=5e-5)
  config.objective.update(alpha_s=0.2, use_mu_cd=True)
  config.langevin.update(train_steps=10, test_steps=20, step_size=5e-6)
  config.buffer.update(use=False, p_max=0.6, anneal_steps=5000, capacity=10000)
  return common.apply_variant(config, arg)
