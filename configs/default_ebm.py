"""Shared defaults of every stage-2 (EBM) config (VAEBM_SPEC.md §2, §3). Per-dataset files override.

`vae_workdir` must point at a finished stage-1 run of the same dataset.
"""

import ml_collections

from configs import common


def get_default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = "ebm"
  config.seed = 0
  config.cpu_devices = 0
  config.vae_workdir = ml_collections.config_dict.placeholder(str)
  # The frozen NVAE's latent groups: False = separate modules, straight-line code (Langevin steps
  # faster on XLA:CPU, experiments/RESULTS.md); True = one nn.scan per scale (fastest compile).
  config.vae_scan_groups = False
  # Rematerialise the frozen NVAE's cells in the Langevin gradient: far fewer stored activations for
  # 3-14 % more time (experiments/RESULTS.md, issue 10). Off in every config, as in the reference.
  config.vae_remat_cells = False
  # Operand dtype of the frozen NVAE's convolutions in stage 2 (whatever stage 1 trained with): float32,
  # or bfloat16 on GPUs/TPUs, where the sampler stays within float32's tolerance (experiments/RESULTS.md,
  # tests/test_sampling.py); accumulation, outputs and every log-density stay float32.
  config.vae_conv_dtype = "float32"

  config.data = data = ml_collections.ConfigDict()
  data.name = "cifar10"
  data.data_dir = ml_collections.config_dict.placeholder(str)
  data.random_flip = True

  # EnergyNet(architecture, n_channel, data_init, conv_impl, conv_dtype=...)
  config.ebm = ebm = ml_collections.ConfigDict()
  ebm.architecture = "cifar10"       # block list (VAEBM_SPEC.md §4)
  ebm.n_channel = 128
  ebm.data_init = True
  ebm.data_init_batches = 5          # 5 × 32 = 160 real images
  ebm.conv_impl = "auto"
  ebm.conv_dtype = "float32"         # or bfloat16 (GPUs/TPUs), as config.vae_conv_dtype
  ebm.num_layers = 3                 # architecture='mlp' only (2-D data): hidden layers of n_channel units

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 32
  train.num_train_steps = 30_000
  train.log_every_steps = 50
  train.image_every_steps = 500
  train.checkpoint_every_steps = 500
  train.keep_checkpoints = 10        # "training eventually explodes": keep several to choose from
  train.num_image_samples = 64

  # "Training eventually explodes" (VAEBM's README): watch E⁺ − E⁻, the loss, the energies and the
  # gradient norm; roll back to the last good checkpoint with a lower learning rate.
  config.guard = common.guard_config("energy_diff,loss,energy_pos,energy_neg,grad_norm", keep_good=5)

  # The same sections as stage 1: optim (how ψ is updated), objective (what is minimised).
  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 4e-5         # constant; Adam(b1, b2), coupled L2
  optim.weight_decay = 3e-5
  optim.b1 = 0.99
  optim.b2 = 0.999
  optim.grad_clip = True             # IGEBM clip (on by default in the reference)

  config.objective = obj = ml_collections.ConfigDict()
  obj.alpha_s = 0.2                  # spectral regulariser coefficient
  obj.use_mu_cd = False              # negatives: decoder mean (True) or sample (False)

  # Langevin chains in training (train_steps) and at sampling time (test_steps).
  config.langevin = lv = ml_collections.ConfigDict()
  lv.train_steps = 10
  lv.test_steps = 16
  lv.step_size = 8e-5                # η: ε ← ε − η/2 ∇U + √η ξ
  lv.potential = "code"              # code | paper (VAEBM_SPEC.md §1.4)
  lv.temperature = 1.0
  lv.unroll = 1                      # lax.scan unroll of the chain
  lv.noise_scale = 1.0               # multiplies √η (1 = Langevin dynamics)
  # 'eps': VAEBM. 'pixel': baselines, the chain on x with U = E(x) from pixel_init: 'vae_mean' /
  # 'vae_sample' (the paper's x-space ablation) or 'noise' (uniform: a short-run EBM).
  lv.space = "eps"
  lv.pixel_init = "vae_mean"

  config.buffer = buf = ml_collections.ConfigDict()
  buf.use = False
  buf.p_max = 0.6
  buf.anneal_steps = 5000
  buf.capacity = 10_000              # ε_z entries per device (the reference: one buffer per GPU process)

  config.sample = sample = ml_collections.ConfigDict()   # --mode=sample
  sample.num_samples = 100
  sample.batch_size = 20
  sample.step = ml_collections.config_dict.placeholder(int)   # stage-2 checkpoint; default the latest
  sample.normalize = "clip"        # clip | minmax: the reference's per-image min-max (save_image(normalize=True))

  config.eval = common.eval_config()       # --mode=eval, on any stage-1 or stage-2 workdir
  return config
