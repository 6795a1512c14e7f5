"""Log-likelihoods: the VAE's importance-weighted estimate of log p(x) (Burda et al. 2016) and
VAEBM's unnormalised log h(x) = log p(x) − E(x) (VAEBM_SPEC.md §1.1, §6 OOD score).

Works on any `models.interface.LikelihoodVAE` (the NVAE, the MLP VAE). For the NVAE's Gaussian
decoder, p(x|z) is NVAE's own continuous density of 2x − 1 on [−1, 1] (no σ floor, §5.5); add
D·log 2 to have the density of x on [0, 1]. The estimate is a lower bound in expectation that
tightens as K grows (K = 1 is the ELBO).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vaebm_jax.models.interface import LikelihoodVAE


def iw_log_likelihood(key: jax.Array, vae_variables: Any, x: jax.Array, *, vae: LikelihoodVAE,
                      num_samples: int = 100, chunk: int = 10) -> jax.Array:
  """log p(x) ≈ logsumexp_k log w_k − log K, w_k = p(x, z_k)/q(z_k|x), z_k ~ q(z|x). Pure and jittable.

  Args:
    key: PRNG key.
    vae_variables: the VAE's variables (eval-mode BN).
    x: a batch of data (B, *vae.image_shape).
    num_samples: K importance samples per example.
    chunk: samples drawn at once (memory); K must divide by it.
  Returns:
    (B,) estimates.
  """
  chunk = min(chunk, num_samples)
  if num_samples % chunk:
    raise ValueError(f"num_samples ({num_samples}) must be divisible by chunk ({chunk})")

  def draw(_, k):
    keys = jax.random.split(k, chunk)
    return None, jax.vmap(lambda kk: vae.log_importance_weight(vae_variables, x, kk))(keys)   # (chunk, B)

  _, log_w = jax.lax.scan(draw, None, jax.random.split(key, num_samples // chunk))
  log_w = log_w.reshape(num_samples, -1)
  return jax.scipy.special.logsumexp(log_w, axis=0) - math.log(num_samples)


def log_h_unnormalized(log_px: jax.Array, energy: jax.Array) -> jax.Array:
  """VAEBM's log h(x) + log Z = log p(x) − E(x)."""
  return log_px - energy


def evaluate_log_likelihood(key: jax.Array, vae_variables: Any, data: np.ndarray, *, vae: LikelihoodVAE,
                            num_samples: int = 100, batch_size: int = 100, chunk: int = 10,
                            ebm: Optional[Any] = None, ebm_variables: Optional[Any] = None) -> dict[str, np.ndarray]:
  """Per-example log p(x) (IW, K = `num_samples`) over a dataset, and log p(x) − E(x) when an EBM is given.

  Data are padded to whole batches (the padding is dropped from the result).
  Returns:
    {'log_px': (N,), and with an EBM 'energy': (N,), 'log_h': (N,)} as numpy arrays.
  """
  data = np.asarray(data, np.float32)
  if data.shape[1:] != tuple(vae.image_shape):
    raise ValueError(f"data of shape {data.shape[1:]} do not fit the VAE, which models {tuple(vae.image_shape)}")
  ll_fn = jax.jit(lambda k, x: iw_log_likelihood(k, vae_variables, x, vae=vae, num_samples=num_samples,
                                                  chunk=chunk))
  energy_fn = jax.jit(lambda x: ebm.apply(ebm_variables, x)) if ebm is not None else None
  n = data.shape[0]
  out: dict[str, list] = {"log_px": [], "energy": []}
  for i, start in enumerate(range(0, n, batch_size)):
    x = data[start:start + batch_size]
    pad = batch_size - x.shape[0]
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    out["log_px"].append(np.asarray(ll_fn(jax.random.fold_in(key, i), x))[:batch_size - pad])
    if energy_fn is not None:
      out["energy"].append(np.asarray(energy_fn(x))[:batch_size - pad])
  result = {"log_px": np.concatenate(out["log_px"]).astype(np.float64)}
  if energy_fn is not None:
    result["energy"] = np.concatenate(out["energy"]).astype(np.float64)
    result["log_h"] = log_h_unnormalized(result["log_px"], result["energy"])
  return result


def _decoder_on_z_grid(vae_variables: Any, vae: Any, z_range: float, z_points: int):
  """Decoder (μ, σ) of a 2-D-latent VAE on a z-grid, and log p(z_j)·Δz² per grid point."""
  if tuple(vae.latent_shapes()) != ((2,),):
    raise ValueError(f"quadrature needs one 2-D latent group, the VAE has {vae.latent_shapes()}")
  axis = np.linspace(-z_range, z_range, z_points, dtype=np.float32)
  dz = float(axis[1] - axis[0])
  z = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
  eps = z / 1.01                     # the top prior is N(0, 1.01²): z = 1.01·ε_z; log_p_z is the density of z
  out = jax.jit(lambda e: vae.decode_from_eps(vae_variables, [e], jnp.zeros_like(e)))(jnp.asarray(eps))
  dist = vae.decoder_distribution(out["logits"]).dist
  return (np.asarray(dist.mu, np.float64), np.asarray(dist.sigma, np.float64),
          np.asarray(out["log_p_z"], np.float64) + 2 * math.log(dz))


def log_density_on_xgrid_2d(vae_variables: Any, axis: np.ndarray, *, vae: Any, z_range: float = 5.0,
                            z_points: int = 600) -> np.ndarray:
  """log p(x) of a 2-D-latent VAE at every point of the x-grid axis × axis (returned (len, len), [i, j] =
  (axis[j], axis[i])), by the same z-quadrature as `log_density_on_grid_2d`.

  p(x|z) factorises over the two coordinates, so the sum over z-grid points is one float64 matrix
  product Φᵀ·diag(w)·Ψ (seconds instead of a pass over every (x, z) pair); values are exact down to
  ~1e-300 of the largest term.
  """
  mu, sigma, log_w = _decoder_on_z_grid(vae_variables, vae, z_range, z_points)
  axis = np.asarray(axis, np.float64)
  log_phi = [-0.5 * ((axis[None] - mu[:, c:c + 1]) / sigma[:, c:c + 1]) ** 2 - 0.5 * math.log(2 * math.pi)
             - np.log(sigma[:, c:c + 1]) for c in range(2)]                    # (J, n) per coordinate
  shifts = [lp.max(axis=1, keepdims=True) for lp in log_phi]
  log_c = log_w[:, None] + shifts[0] + shifts[1]
  top = log_c.max()
  weights = np.exp(log_c - top)                                                 # (J, 1)
  density = (np.exp(log_phi[1] - shifts[1]) * weights).T @ np.exp(log_phi[0] - shifts[0])   # [x2, x1]
  with np.errstate(divide="ignore"):
    return np.log(density) + top


def log_density_on_grid_2d(vae_variables: Any, points: np.ndarray, *, vae: Any, z_range: float = 5.0,
                           z_points: int = 600, chunk: int = 256) -> np.ndarray:
  """log p(x) of a VAE with a 2-D latent by quadrature over a z-grid (exact up to the grid), for 2-D data.

  p(x) = ∫ p(x|z) p(z) dz ≈ Σ_j p(x|z_j) p(z_j) Δz² over a `z_points`² grid on [−z_range, z_range]².
  Used by the 2-D experiment, where it checks the IW estimate and normalises VAEBM on a grid.
  """
  mu, sigma, log_prior = (a.astype(np.float32) for a in _decoder_on_z_grid(vae_variables, vae, z_range, z_points))

  @jax.jit
  def chunk_ll(x):
    d = (x[:, None, :] - mu[None]) / sigma[None]
    log_px_z = jnp.sum(-0.5 * d * d - 0.5 * math.log(2 * math.pi) - jnp.log(sigma)[None], -1)
    return jax.scipy.special.logsumexp(log_px_z + log_prior[None], axis=1)

  points = np.asarray(points, np.float32)
  return np.concatenate([np.asarray(chunk_ll(points[i:i + chunk])) for i in range(0, len(points), chunk)])
