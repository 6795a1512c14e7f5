"""Small models and golden-file access shared by the tests."""

import json
import os

import numpy as np
import pytest

from vaebm_jax.models.nvae import NVAE

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "reference",
                      "vaebm_small_golden.npz")


def tiny_nvae(**overrides) -> NVAE:
  kw = dict(image_size=16, image_channels=1, num_channels_enc=8, num_channels_dec=8, num_latent_scales=2,
            num_groups_per_scale=2, num_latent_per_group=4, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1,
            num_preprocess_cells=1, num_postprocess_cells=1, num_nf=1)
  kw.update(overrides)
  return NVAE(**kw)


def golden():
  if not os.path.exists(GOLDEN):
    pytest.skip("reference outputs ../shared/reference/vaebm_small_golden.npz not present")
  return np.load(GOLDEN)


def golden_nvae(d) -> NVAE:
  args = json.loads(str(d["meta/nvae_args"]))
  return NVAE(image_size=32, image_channels=3, num_channels_enc=args["num_channels_enc"],
              num_channels_dec=args["num_channels_dec"], num_latent_scales=args["num_latent_scales"],
              num_groups_per_scale=args["num_groups_per_scale"], num_latent_per_group=args["num_latent_per_group"],
              num_cell_per_cond_enc=args["num_cell_per_cond_enc"], num_cell_per_cond_dec=args["num_cell_per_cond_dec"],
              num_preprocess_blocks=args["num_preprocess_blocks"], num_preprocess_cells=args["num_preprocess_cells"],
              num_postprocess_blocks=args["num_postprocess_blocks"],
              num_postprocess_cells=args["num_postprocess_cells"], num_nf=args["num_nf"],
              use_se=args["use_se"], res_dist=args["res_dist"], arch_instance=args["arch_instance"])


def golden_variables(d):
  """(the golden file's NVAE module, its variables, the energy network's variables) in our layout."""
  from vaebm_jax.models import torch_import
  base = golden_nvae(d)
  vv = torch_import.nvae_variables_from_torch({k[5:]: d[k] for k in d.files if k.startswith("nvae/")}, base)
  ev = torch_import.convert_state_dict({k[4:]: d[k] for k in d.files if k.startswith("ebm/")})
  return base, vv, ev


def nchw_to_nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def assert_elbo_matches_golden(d, mode: str, out, x) -> None:
  """An NVAE ElboOutput against the official implementation's `elbo_<mode>/out/*` (logits, log q,
  log p, per-group KL, and the floored Gaussian log-density of x)."""
  import jax.numpy as jnp

  from vaebm_jax.models import distributions
  ref = lambda name: d[f"elbo_{mode}/out/{name}"]
  np.testing.assert_allclose(out.logits, nchw_to_nhwc(ref("logits")), rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(out.log_q, ref("log_q"), rtol=1e-5)
  np.testing.assert_allclose(out.log_p, ref("log_p"), rtol=1e-5)
  for i in range(len(out.kl_all)):
    np.testing.assert_allclose(out.kl_all[i], ref(f"kl_all/{i}"), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.kl_diag[i], ref(f"kl_diag/{i}"), rtol=1e-5, atol=1e-4)
  recon = jnp.sum(distributions.NormalDecoder(out.logits).floored_log_prob(x), axis=(1, 2, 3))
  np.testing.assert_allclose(recon, ref("recon_log_prob"), rtol=1e-5)


def restore_stage1(workdir):
  """What stage 1 resumes from: the config, the model and the full train state restored into
  create_train_state's shape (imports the loop modules only when called)."""
  import functools

  import jax

  from vaebm_jax import checkpoint, train_vae
  ckpt = checkpoint.Checkpointer(str(workdir), max_to_keep=None)
  config = ckpt.restore_config()
  model = train_vae.create_model(config)
  tx, _ = train_vae.create_optimizer(config, 1, 1)
  target = jax.eval_shape(functools.partial(train_vae.create_train_state, model, tx, image_shape=model.image_shape),
                          jax.random.key(0))
  state = ckpt.restore(target)
  ckpt.close()
  return config, model, state
