"""A second official NVAE checkpoint, of another architecture than ../shared/reference's, through the importer.

tests/data/nvae_second_checkpoint.pt and the official outputs for it, tests/data/nvae_second_outputs.npz,
come from experiments/make_official_checkpoint.py (run with PyTorch and the NVlabs checkouts; see its
docstring): celeba_64 (64×64, 5 bits), 2 encoder / 4 decoder channels, 3 latent scales with ada_groups
(4, 2, 1 groups), 3 latent channels, 1 encoder / 2 decoder cells per group, 2 pre/post blocks of 1 / 2
cells, 2 flows, saved by a 2-process train.py run. The workdir the importer writes must reproduce the
official ELBO path (BN eval and train) and sampling path with its ε-gradient.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_elbo_matches_golden, nchw_to_nhwc, restore_stage1
from vaebm_jax import import_nvae
from vaebm_jax.models import nvae

pytestmark = pytest.mark.slow   # imports and compiles a 64×64, 7-group NVAE (~30–50 s)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CHECKPOINT = os.path.join(DATA, "nvae_second_checkpoint.pt")
OUTPUTS = os.path.join(DATA, "nvae_second_outputs.npz")


@pytest.fixture(scope="module")
def official():
  return np.load(OUTPUTS)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """The checkpoint imported once, restored as stage 1 / stage 2 restore it: (workdir, config, model, state)."""
  workdir = tmp_path_factory.mktemp("import_second") / "celeba64_vae"
  assert import_nvae.import_checkpoint(CHECKPOINT, workdir) == 150
  config, model, state = restore_stage1(workdir)
  return workdir, config, model, state


def test_config_follows_the_checkpoints_args(imported, official):
  workdir, config, model, state = imported
  args = json.loads(str(official["meta/nvae_args"]))
  assert config.data.name == "celeba64" and config.stage == "vae"
  assert (model.image_size, model.image_channels, model.decoder) == (64, 3, "normal")
  assert {k: config.model[k] for k in import_nvae._ARCH_INT_FLAGS + import_nvae._ARCH_BOOL_FLAGS} == \
      {k: args[k] for k in import_nvae._ARCH_INT_FLAGS + import_nvae._ARCH_BOOL_FLAGS}
  assert model.groups == [4, 2, 1] and model.num_groups == 7
  assert config.train.batch_size == 32            # 16 per process × 2 processes
  assert (config.train.epochs, config.seed, config.optim.learning_rate) == (4, 3, 6e-3)
  assert int(state.step) == 150
  record = json.loads((workdir / import_nvae.IMPORT_RECORD).read_text())
  assert (record["epoch"], record["global_step"], record["args"]["dataset"]) == (3, 150, "celeba_64")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_elbo_path_matches_official_implementation(imported, official, mode):
  _, _, model, state = imported
  d = official
  eps = [nchw_to_nhwc(d[f"elbo_{mode}/in/eps/{i}"]) for i in range(model.num_groups)]
  x = nchw_to_nhwc(d["elbo/in/x"])
  out, _ = jax.jit(lambda v, x, eps: model.apply(v, x, mode == "train", eps, mutable=["batch_stats"]))(
      state.variables, x, eps)
  assert len(out.kl_all) == model.num_groups
  assert_elbo_matches_golden(d, mode, out, x)


def test_sampling_path_and_its_eps_gradient_match_official_implementation(imported, official):
  _, _, model, state = imported
  d = official
  eps_z = [nchw_to_nhwc(d[f"in/eps_z/{i}"]) for i in range(model.num_groups)]
  eps_x = nchw_to_nhwc(d["in/eps_x"])
  assert [e.shape[1:] for e in eps_z] == model.latent_shapes()

  def run(eps):
    out = nvae.decode_from_eps(model, state.variables, eps[0], eps[1])
    return jnp.sum(out["log_p_z"] + out["log_p_x_given_z"]), out

  (_, out), grads = jax.jit(jax.value_and_grad(run, has_aux=True))((eps_z, eps_x))
  np.testing.assert_allclose(out["logits"], nchw_to_nhwc(d["out/logits"]), rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(out["mean"], nchw_to_nhwc(d["out/mean_image"]), atol=2e-6)
  np.testing.assert_allclose(out["x"], nchw_to_nhwc(d["out/x_sample"]), atol=2e-6)
  np.testing.assert_allclose(out["log_p_z"], d["out/log_p_z"], rtol=1e-5)
  np.testing.assert_allclose(out["log_p_x_given_z"], d["out/log_p_x_given_z"], rtol=1e-5)
  for i in range(model.num_groups):
    np.testing.assert_allclose(grads[0][i], nchw_to_nhwc(d[f"out/dlogp_deps_z/{i}"]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads[1], nchw_to_nhwc(d["out/dlogp_deps_x"]), rtol=1e-4, atol=1e-5)
