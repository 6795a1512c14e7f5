"""Shared defaults of every stage-1 (NVAE) config. Per-dataset files override these.

Values are NVAE's / VAEBM's (VAEBM_SPEC.md §5.6, §5.7, §5.9). `train.batch_size` is the *global*
batch; the reference's is 32 per GPU × 8 GPUs = 256.
"""

import ml_collections
from ml_collections import config_dict

from configs import common


def get_default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = "vae"
  config.seed = 0
  # On CPU: simulated devices (0 = one per core). One device, using both cores inside each op, ran
  # the NVAE step faster here than two (experiments/RESULTS.md).
  config.cpu_devices = 1

  config.data = data = ml_collections.ConfigDict()
  data.name = "cifar10"             # cifar10 | celeba64 | lsun_church64 | celebahq256 | fashion_mnist | digits
  data.data_dir = ml_collections.config_dict.placeholder(str)   # tfds data_dir or IDX directory
  data.random_flip = True

  # MODELS[model_type](**config.model): 'nvae' (NVAE) or 'mlp_vae' (the 2-D experiment's MLP VAE)
  config.model_type = "nvae"
  config.model = model = ml_collections.ConfigDict()
  model.image_size = 32
  model.image_channels = 3
  model.num_channels_enc = 128
  model.num_channels_dec = 128
  model.num_latent_scales = 1
  model.num_groups_per_scale = 30
  model.num_latent_per_group = 20
  model.ada_groups = False
  model.min_groups_per_scale = 1
  model.num_cell_per_cond_enc = 2
  model.num_cell_per_cond_dec = 2
  model.num_preprocess_blocks = 1
  model.num_preprocess_cells = 2
  model.num_postprocess_blocks = 1
  model.num_postprocess_cells = 2
  model.num_nf = 1
  model.decoder = "normal"          # VAEBM needs the Gaussian decoder (num_mixture_dec = 1)
  model.num_mixture_dec = 10
  model.num_x_bits = 8
  model.use_se = True
  model.res_dist = True
  model.arch_instance = "res_mbconv"
  model.conv_impl = "auto"          # auto | xla | fast_cpu
  # Operand dtype of the convolutions: float32, or bfloat16 on GPUs/TPUs (float32 accumulation and
  # outputs; BN, Swish and the likelihood stay float32; the reference trains NVAE with fp16 autocast)
  model.conv_dtype = "float32"
  # Rematerialise cells in the backward pass: None = on CPU only (faster there: the NVAE step, issue
  # 10), off elsewhere as in the reference; True/False to choose. With remat_keep_convs the
  # convolutions' outputs are kept and only BN, Swish and SE are recomputed.
  model.remat_cells = config_dict.placeholder(bool)
  model.remat_keep_convs = True

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 256
  train.epochs = 400
  train.num_train_steps = -1        # > 0 overrides epochs × steps per epoch
  train.log_every_steps = 50
  train.image_every_steps = 2000
  train.checkpoint_every_steps = 1000
  train.eval_every_steps = 5000
  train.num_eval_batches = 10
  train.eval_batch_size = 64
  train.keep_checkpoints = 3
  train.num_image_samples = 64

  # Stage 1 already skips non-finite updates; the guard rolls back when the NELBO runs away.
  config.guard = common.guard_config("nelbo", keep_good=3)

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 1e-2
  optim.learning_rate_min = 1e-4
  optim.weight_decay = 3e-4
  optim.warmup_epochs = 5.0
  optim.adamax_eps = 1e-3

  config.objective = obj = ml_collections.ConfigDict()
  obj.kl_anneal_portion = 0.3
  obj.kl_const_portion = 1e-4
  obj.kl_const_coeff = 1e-4
  obj.kl_balance = True
  obj.weight_decay_norm = 1e-1      # λ of the spectral and BN-γ penalties
  obj.weight_decay_norm_init = 10.0
  obj.weight_decay_norm_anneal = False
  obj.num_power_iter = 4

  config.eval = common.eval_config()       # --mode=eval, on any stage-1 or stage-2 workdir
  return config
