"""Training objectives: NVAE's negative ELBO with KL warm-up and balancing, and the spectral and
BN-γ regularisers (VAEBM_SPEC.md §5.6). Pure functions over arrays and pytrees.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# ----------------------------------------------------------------------------------------------
# KL warm-up, KL balancing, λ annealing
# ----------------------------------------------------------------------------------------------


def kl_coefficient(step, total_steps: int, anneal_portion: float = 0.3, const_portion: float = 1e-4,
                   min_coeff: float = 1e-4):
  """β(step) = max(min((step − c·T)/(a·T), 1), β_min)."""
  anneal = max(anneal_portion * total_steps, 1.0)
  return jnp.maximum(jnp.minimum((step - const_portion * total_steps) / anneal, 1.0), min_coeff)


def kl_balancer_coefficients(groups_per_scale: Sequence[int], fun: str = "square") -> np.ndarray:
  """Static α per group (top scale first): the scale i-th from the top gets (2^i)²/G_i, normalised
  so the smallest is 1."""
  num_scales = len(groups_per_scale)
  coeffs = []
  for i in range(num_scales):
    g = groups_per_scale[num_scales - i - 1]
    value = {"equal": 1.0, "linear": 2.0 ** i, "sqrt": math.sqrt(2 ** i), "square": (2 ** i) ** 2 / g}[fun]
    coeffs += [value] * g
  coeffs = np.asarray(coeffs, np.float32)
  return coeffs / coeffs.min()


def balanced_kl(kl_all: Sequence[jax.Array], beta, alpha: np.ndarray):
  """KL balancing (active only while β < 1).

  Args:
    kl_all: per group, (B,).
    beta: KL warm-up coefficient.
    alpha: static per-group coefficients from `kl_balancer_coefficients`.
  Returns:
    (β · balanced KL per example (B,), per-group coefficients used (G,), per-group batch-mean KL (G,)).
  """
  kl = jnp.stack(kl_all, axis=1)                                   # B, G
  kl_vals = jnp.mean(kl, axis=0)
  coeff = jnp.mean(jnp.abs(kl), axis=0) + 0.01
  coeff = coeff / alpha * jnp.sum(coeff)
  coeff = jax.lax.stop_gradient(coeff / jnp.mean(coeff))
  balance = beta < 1.0
  coeff = jnp.where(balance, coeff, jnp.ones_like(coeff))
  return beta * jnp.sum(kl * coeff, axis=1), coeff, kl_vals


def annealed_norm_coefficient(beta, initial: float, final: float, anneal: bool):
  """λ = exp((1 − β) log λ_init + β log λ_final) with annealing, else λ_final."""
  if not anneal:
    return jnp.asarray(final, jnp.float32)
  return jnp.exp((1.0 - beta) * math.log(initial) + beta * math.log(final))


# ----------------------------------------------------------------------------------------------
# Spectral regulariser by power iteration (§3.1, §5.6). The u/v state lives in the train state.
# ----------------------------------------------------------------------------------------------


def _weight_matrices(normalized_weights: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Groups the sown HWIO kernels by their (C_out, C_in·k·k) matrix shape; stacks each group.

  Kernels of scanned modules arrive stacked, (G, k, k, C_in, C_out): each of the G is one matrix.
  """
  flat = traverse_util.flatten_dict(dict(normalized_weights), sep="/")
  groups: dict[str, list] = {}
  for name in sorted(flat):
    for kernel in flat[name]:
      k, c_in, c_out = kernel.shape[-3], kernel.shape[-2], kernel.shape[-1]
      matrices = jnp.moveaxis(kernel.reshape((-1, k, k, c_in, c_out)), (4, 3), (1, 2)).reshape(-1, c_out, c_in * k * k)
      groups.setdefault(f"{c_out}x{c_in * k * k}", []).append(matrices)
  return {shape: jnp.concatenate(ms) for shape, ms in groups.items()}


def _normalize(x: jax.Array, eps: float = 1e-3) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _power_iterate(ws: Mapping[str, jax.Array], uvs: Mapping[str, tuple], num_iter: int) -> dict[str, tuple]:
  """`num_iter` power iterations of every weight group, each shape on its own, in one loop for all shapes
  (fewer loops in the compiled steps)."""
  def body(_, uvs):
    out = {}
    for shape, (u, v) in uvs.items():
      v = _normalize(jnp.einsum("nr,nrc->nc", u, ws[shape]))
      out[shape] = (_normalize(jnp.einsum("nrc,nc->nr", ws[shape], v)), v)
    return out
  return jax.lax.fori_loop(0, num_iter, body, dict(uvs))


def init_spectral_state(key: jax.Array, normalized_weights: Mapping[str, Any], num_iter: int = 40):
  """Random u, v per weight shape, refined by `num_iter` (10 × 4 in the reference) iterations.

  The random starts of every shape come from one draw: on CPU each random call is a loop of its own,
  and one call per shape made this function's compile take seconds.
  """
  ws = {shape: jax.lax.stop_gradient(w) for shape, w in sorted(_weight_matrices(normalized_weights).items())}
  sizes = [s for w in ws.values() for s in (w.shape[0] * w.shape[1], w.shape[0] * w.shape[2])]
  draws = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1]) if sizes else []
  uvs = {}
  for i, (shape, w) in enumerate(ws.items()):
    uvs[shape] = (_normalize(draws[2 * i].reshape(w.shape[:2])),
                  _normalize(draws[2 * i + 1].reshape(w.shape[0], w.shape[2])))
  return {shape: {"u": u, "v": v} for shape, (u, v) in _power_iterate(ws, uvs, num_iter).items()}


def spectral_norm_penalty(normalized_weights: Mapping[str, Any], state: Mapping[str, Any], num_iter: int = 4):
  """Σ over all convs of σ_max(W) ≈ uᵀWv, with u, v advanced by `num_iter` power iterations.

  Returns (penalty, new_state). σ is differentiable in W; u and v are held fixed.
  """
  weights = _weight_matrices(normalized_weights)
  uvs = _power_iterate({shape: jax.lax.stop_gradient(w) for shape, w in weights.items()},
                       {shape: (state[shape]["u"], state[shape]["v"]) for shape in weights}, num_iter)
  total = 0.0
  for shape, w in weights.items():
    u, v = uvs[shape]
    total = total + jnp.sum(jnp.einsum("nr,nrc,nc->n", u, w, v))
  return total, {shape: {"u": u, "v": v} for shape, (u, v) in uvs.items()}


def batchnorm_gamma_penalty(params: Mapping[str, Any]) -> jax.Array:
  """Σ over BN layers of max|γ| (BN scales are the only 'scale' leaves in our models).

  A scanned module's γ is (G, C): one max per layer of the stack.
  """
  flat = traverse_util.flatten_dict(dict(params))
  scales = [jnp.sum(jnp.max(jnp.abs(v), axis=-1)) for k, v in flat.items() if k[-1] == "scale"]
  return jnp.sum(jnp.stack(scales)) if scales else jnp.zeros(())


def reconstruction_log_prob(decoder_dist, x: jax.Array, crop: int = 0) -> jax.Array:
  """Σ log p(x|z) per example; `crop` pixels are dropped at each border (MNIST padded to 32)."""
  log_prob = decoder_dist.log_prob(x)
  if crop:
    log_prob = log_prob[:, crop:-crop, crop:-crop]
  return jnp.sum(log_prob.reshape(log_prob.shape[0], -1), axis=1)
