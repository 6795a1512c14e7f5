"""The sampler, the pixel-space baselines and the likelihood metrics on a VAE other than the NVAE."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny_nvae
from vaebm_jax import sampling
from vaebm_jax.data import synthetic
from vaebm_jax.metrics import likelihood
from vaebm_jax.models import interface, nvae
from vaebm_jax.models.mlp import MLPVAE, MLPEnergy


class QuadraticEnergy(nn.Module):
  """E(x) = ½‖(x − m)/s‖², so exp(−E) is N(m, s²)."""
  mean: tuple
  std: tuple

  @nn.compact
  def __call__(self, x):
    self.param("unused", nn.initializers.zeros, (1,))
    e = 0.5 * jnp.square((x - jnp.asarray(self.mean)) / jnp.asarray(self.std))
    return jnp.sum(e.reshape(e.shape[0], -1), axis=1)


@pytest.fixture(scope="module")
def mlp():
  vae = MLPVAE(data_dim=2, latent_dim=2, hidden=32, num_layers=2)
  x = jax.random.normal(jax.random.key(0), (16, 2))
  vv = jax.jit(vae.init, static_argnums=2)({"params": jax.random.key(1), "sample": jax.random.key(2)}, x, True)
  return vae, {"params": vv["params"]}


def test_nvae_and_mlp_vae_implement_the_interface(mlp):
  for vae in (tiny_nvae(), mlp[0]):
    assert isinstance(vae, interface.LikelihoodVAE)
    assert interface.check_vae(vae) is vae
  with pytest.raises(TypeError, match="not a ReparameterizedVAE"):
    interface.check_vae(object())


def test_nvae_method_is_the_decode_of_the_reference_map():
  vae = tiny_nvae()
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
  v = jax.jit(vae.init, static_argnums=2)({"params": jax.random.key(1), "sample": jax.random.key(2)}, x, True)
  v = {"params": v["params"], "batch_stats": v["batch_stats"]}
  eps_z, eps_x = sampling.initial_noise(jax.random.key(3), vae, 2)
  a = jax.jit(vae.decode_from_eps)(v, eps_z, eps_x)
  b = jax.jit(lambda v, z, x: nvae.decode_from_eps(vae, v, z, x))(v, eps_z, eps_x)
  for k in interface.DECODE_KEYS:
    np.testing.assert_array_equal(a[k], b[k])


def test_eps_space_sampler_runs_on_an_mlp_vae_and_paper_potential_keeps_n01(mlp):
  vae, vv = mlp
  ebm = MLPEnergy(hidden=16, num_layers=2)
  ev = ebm.init(jax.random.key(4), jnp.zeros((2, 2)))
  params = {"vae": vv, "ebm": jax.tree.map(jnp.zeros_like, ev)}          # E ≡ 0
  images, extras = jax.jit(functools.partial(
      sampling.sample_fn, vae=vae, ebm=ebm, num_samples=4000, num_steps=60, step_size=0.05, potential="paper",
      return_eps=True))(jax.random.key(5), params)
  assert images.shape == (4000, 2)
  values = np.concatenate([np.asarray(extras["eps_z"][0]).ravel(), np.asarray(extras["eps_x"]).ravel()])
  assert abs(values.mean()) < 0.03
  np.testing.assert_allclose(values.var(), 1.0 / (1.0 - 0.05 / 4), rtol=0.04)


def test_pixel_space_chain_recovers_the_energy_gaussian(mlp):
  vae, vv = mlp
  ebm = QuadraticEnergy(mean=(1.0, -0.5), std=(0.3, 0.6))
  params = {"vae": vv, "ebm": ebm.init(jax.random.key(0), jnp.zeros((1, 2)))}
  for init in ("noise", "vae_sample"):
    x = jax.jit(functools.partial(sampling.sample_fn, vae=vae, ebm=ebm, num_samples=4000, num_steps=800,
                                  step_size=0.01, space="pixel", pixel_init=init, unroll=4))(jax.random.key(1), params)
    np.testing.assert_allclose(np.mean(x, 0), [1.0, -0.5], atol=0.04)
    np.testing.assert_allclose(np.std(x, 0), [0.3, 0.6], rtol=0.05)


@pytest.mark.slow
def test_pixel_init_starts_at_vae_samples_or_uniform_noise():
  vae = tiny_nvae()
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
  v = jax.jit(vae.init, static_argnums=2)({"params": jax.random.key(1), "sample": jax.random.key(2)}, x, True)
  params = {"vae": {"params": v["params"], "batch_stats": v["batch_stats"]}}
  key = jax.random.key(3)
  mean = jax.jit(lambda p: sampling.initial_pixels(key, p, vae=vae, num_samples=4, init="vae_mean"))(params)
  expected = jnp.clip(jax.jit(lambda v: sampling.vae_samples(key, v, vae=vae, num_samples=4))(params["vae"]), 0, 1)
  np.testing.assert_allclose(mean, expected, atol=1e-6)
  noise = sampling.initial_pixels(key, params, vae=vae, num_samples=4, init="noise")
  assert noise.shape == (4, 16, 16, 1) and 0.3 < float(jnp.mean(noise)) < 0.7
  with pytest.raises(ValueError, match="pixel_init"):
    sampling.initial_pixels(key, params, vae=vae, num_samples=4, init="zeros")


@pytest.mark.slow
def test_importance_weighted_likelihood_matches_quadrature_and_bounds_the_elbo(mlp):
  vae, vv = mlp
  x = np.asarray(synthetic.gaussians25("test")[:64]) / 4.0
  exact = likelihood.log_density_on_grid_2d(vv, x, vae=vae, z_range=6.0, z_points=400)
  key = jax.random.key(0)
  iw = likelihood.evaluate_log_likelihood(key, vv, x, vae=vae, num_samples=2000, batch_size=64, chunk=200)["log_px"]
  elbo = likelihood.evaluate_log_likelihood(key, vv, x, vae=vae, num_samples=1, batch_size=64, chunk=1)["log_px"]
  # The two computations agree up to the IW estimator's Monte-Carlo error and the quadrature's grid.
  assert np.mean(np.abs(iw - exact)) < 0.03 and np.max(np.abs(iw - exact)) < 0.15
  assert np.mean(elbo) < np.mean(iw) - 1e-3
  grid = np.linspace(-8, 8, 161)
  points = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
  mass = np.exp(likelihood.log_density_on_grid_2d(vv, points, vae=vae, z_range=6.0, z_points=200)).sum() * 0.1 ** 2
  np.testing.assert_allclose(mass, 1.0, atol=0.02)                  # a normalised density


@pytest.mark.slow
def test_nvae_likelihood_uses_its_unfloored_density():
  vae = tiny_nvae(num_nf=0)
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
  v = jax.jit(vae.init, static_argnums=2)({"params": jax.random.key(1), "sample": jax.random.key(2)}, x, True)
  v = {"params": v["params"], "batch_stats": v["batch_stats"]}
  key = jax.random.key(5)
  log_w = jax.jit(vae.log_importance_weight)(v, x, key)
  out = jax.jit(lambda v, x: vae.apply(v, x, False, rngs={"sample": key}))(v, x)
  recon = jnp.sum(vae.decoder_distribution(out.logits).log_prob(x), axis=(1, 2, 3))
  np.testing.assert_allclose(log_w, recon + out.log_p - out.log_q, rtol=1e-6)
  scores = likelihood.evaluate_log_likelihood(key, v, np.asarray(x), vae=vae, num_samples=4, batch_size=3, chunk=2,
                                              ebm=QuadraticEnergy((0.0,), (1.0,)),
                                              ebm_variables={"params": {"unused": jnp.zeros(1)}})
  assert scores["log_px"].shape == (4,)
  np.testing.assert_allclose(scores["log_h"], scores["log_px"] - scores["energy"])


def test_gaussians25_density_is_normalised_and_matches_its_samples():
  grid = np.linspace(-6, 6, 1201)
  points = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
  mass = np.exp(synthetic.gaussians25_log_density(points)).sum() * (grid[1] - grid[0]) ** 2
  np.testing.assert_allclose(mass, 1.0, atol=1e-3)
  x = synthetic.gaussians25("train")
  nearest = np.argmin(((x[:, None] - synthetic.GAUSSIANS25_MEANS[None]) ** 2).sum(-1), axis=1)
  counts = np.bincount(nearest, minlength=25)
  assert counts.min() > 0.9 * len(x) / 25
  np.testing.assert_allclose(np.std(x - synthetic.GAUSSIANS25_MEANS[nearest], 0), 0.1, rtol=0.02)


def test_stacked_digits_stack_three_labelled_digits():
  from vaebm_jax.data import sources
  images, labels = synthetic.stacked_digits("test", num=50)
  assert images.shape == (50, 16, 16, 3) and labels.shape == (50, 3)
  digits = sources.digits("test")[..., 0]
  for c in range(3):       # every channel is one of the split's digits
    assert all(any(np.array_equal(images[i, ..., c], d) for d in digits) for i in range(5))


def test_grid_quadrature_by_matrix_product_equals_pointwise_quadrature(mlp):
  vae, vv = mlp
  axis = np.linspace(-3, 3, 31)
  grid = likelihood.log_density_on_xgrid_2d(vv, axis, vae=vae, z_points=200)
  points = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
  np.testing.assert_allclose(grid.reshape(-1), likelihood.log_density_on_grid_2d(vv, points, vae=vae, z_points=200),
                             atol=1e-4)
