"""Offline quickstart, both stages in one command: the digits NVAE (configs/digits_vae.py) into W/vae,
then the energy net (configs/digits_ebm.py) into W/ebm, then VAEBM samples into W/ebm/samples.

Needs nothing beyond the install (scikit-learn's bundled 8×8 digits) and runs in minutes on a CPU.

COMMAND: python -m vaebm_jax.main --config=configs/digits_vaebm.py --workdir=workdirs/digits
"""

import ml_collections

from configs import digits_ebm, digits_vae


def get_config(arg: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "vaebm"
  config.cpu_devices = 0
  config.vae = digits_vae.get_config(arg)
  config.ebm = digits_ebm.get_config(arg)
  config.ebm.vae_workdir = ml_collections.config_dict.placeholder(str)   # set to W/vae by main
  return config
