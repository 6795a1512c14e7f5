"""Stage 2 for CelebA-HQ 256: C=64, batch 16 (4 GPUs × 4), lr 4e-5, α_s 0.3, 9k iterations, 6 Langevin steps of η = 3e-6 (24 at test), use_mu_cd, buffer (0.6, 3000, 2000), no data-dependent init (the distributed script's default).

The reference's values (VAEBM_SPEC.md §3.4). Needs a finished stage-1 run of the same dataset.

COMMAND: python -m vaebm_jax.main --config=configs/celebahq256_ebm.py --workdir=workdirs/celebahq256_ebm --config.vae_workdir=workdirs/celebahq256_vae
SAMPLE:  python -m vaebm_jax.main --config=configs/celebahq256_ebm.py --workdir=workdirs/celebahq256_ebm --mode=sample
"""

from configs import common
from configs.default_ebm import get_default_config


def get_config(arg: str = ""):
  config = get_default_config()
  config.data.name = "celebahq256"
  config.vae_workdir = "workdirs/celebahq256_vae"
  config.ebm.update(architecture="celebahq256", n_channel=64, data_init=False)
  config.train.update(batch_size=16, num_train_steps=9000)
  config.optim.update(learning_rate=4e-5)
  config.objective.update(alpha_s=0.3, use_mu_cd=True)
  config.langevin.update(train_steps=6, test_steps=24, step_size=3e-6)
  config.buffer.update(use=True, p_max=0.6, anneal_steps=3000, capacity=2000)
  # Not in the reference: the frozen NVAE's cells are recomputed in the Langevin gradient, so that the step
  # and the 13 GiB per-device buffer fit one 32 GB V100 (compiled estimate 25.8 GiB, 40.1 without;
  # experiments/RESULTS.md, "Replay buffer memory"). Gradients equal up to rounding; ~3-14 % more time per step.
  config.vae_remat_cells = True
  return common.apply_variant(config, arg)
