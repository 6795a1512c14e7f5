"""Training objectives: NVAE's negative ELBO with KL warm-up and balancing, and the spectral and
BN-γ regularisers (VAEBM_SPEC.md §5.6). Pure functions over arrays and pytrees.
"""

from __future__ import annotations

import functools
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


def _weight_matrices(normalized_weights: Mapping[str, Any]) -> list[tuple[str, jax.Array, int, int]]:
  """Each sown HWIO kernel as (shape key, matrices, k, C_in), in the order of the state's stacks.

  The shape key is the reference's `C_outxC_in·k·k`; the state stacks one u, v row per matrix of that
  shape, kernels in sorted name order. Kernels of scanned modules arrive stacked, (G, k, k, C_in, C_out):
  each of the G is one matrix. The matrices are the kernels' own memory, (G, k·k·C_in, C_out): their
  transpose with the columns permuted, which has the same singular values. Only u and v are permuted
  (`_to_ours`/`_to_reference`); transposing and stacking the weights themselves, as the reference
  does, made the penalty and its gradient take 0.85 s per CIFAR-10 step where this takes 0.39 s
  (experiments/benchmark_spectral.py).
  """
  flat = traverse_util.flatten_dict(dict(normalized_weights), sep="/")
  out = []
  for name in sorted(flat):
    for kernel in flat[name]:
      k, c_in, c_out = kernel.shape[-3], kernel.shape[-2], kernel.shape[-1]
      out.append((f"{c_out}x{c_in * k * k}", kernel.reshape(-1, k * k * c_in, c_out), k, c_in))
  return out


def _to_ours(v: jax.Array, k: int, c_in: int) -> jax.Array:
  """v's columns from the reference's (C_in, kh, kw) order to the kernel's (kh, kw, C_in)."""
  return v if k == 1 else v.reshape(-1, c_in, k, k).transpose(0, 2, 3, 1).reshape(v.shape)


def _to_reference(v: jax.Array, k: int, c_in: int) -> jax.Array:
  return v if k == 1 else v.reshape(-1, k, k, c_in).transpose(0, 3, 1, 2).reshape(v.shape)


def _normalize(x: jax.Array, eps: float = 1e-3) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _split_state(matrices, state) -> list[tuple[jax.Array, jax.Array]]:
  """Each matrix stack's rows of the per-shape u, v state, v in the kernel's order."""
  offsets, uvs = {}, []
  for shape, m, k, c_in in matrices:
    o, g = offsets.get(shape, 0), m.shape[0]
    offsets[shape] = o + g
    uvs.append((state[shape]["u"][o:o + g], _to_ours(state[shape]["v"][o:o + g], k, c_in)))
  return uvs


def _join_state(matrices, uvs) -> dict[str, dict[str, jax.Array]]:
  us, vs = {}, {}
  for (shape, _, k, c_in), (u, v) in zip(matrices, uvs, strict=True):
    us.setdefault(shape, []).append(u)
    vs.setdefault(shape, []).append(_to_reference(v, k, c_in))
  return {shape: {"u": jnp.concatenate(us[shape]), "v": jnp.concatenate(vs[shape])} for shape in us}


# The iterations run matrix by matrix, a few matrices (≤ _CHUNK_BYTES) at a time, so that each chunk's
# 2·num_iter matrix-vector products after the first read it from cache: iterating over the whole stack
# at once, as the reference does, reads every weight from memory 2·num_iter + 1 times per step (0.52 GB
# each time in the CIFAR-10 NVAE). σ = vᵀWu is formed in the same pass, and its gradient u vᵀ is written
# directly (`_iterate_and_sigma`'s VJP).
_CHUNK_BYTES = 8 << 20


def _power_iterate_one(w: jax.Array, u: jax.Array, v: jax.Array, num_iter: int):
  """One matrix w (K, O) as the kernel lies in memory: v ← normalize(W u), u ← normalize(Wᵀ v), i.e. the
  reference's v ← normalize(uᵀW), u ← normalize(W v) on its transposed matrix; then σ = vᵀ W u."""
  def body(_, uv):
    u, v = uv
    v = _normalize(w @ u)
    return _normalize(v @ w), v
  u, v = jax.lax.fori_loop(0, num_iter, body, (u, v))
  return v @ (w @ u), u, v


def _iterate_stack(w: jax.Array, u: jax.Array, v: jax.Array, num_iter: int):
  """(σ (G,), u (G, O), v (G, K)) of a stack w (G, K, O), chunk by chunk."""
  w = jax.lax.stop_gradient(w)
  one = jax.vmap(functools.partial(_power_iterate_one, num_iter=num_iter))
  g = w.shape[0]
  chunk = min(g, max(1, _CHUNK_BYTES // (w.shape[1] * w.shape[2] * w.dtype.itemsize)))
  if chunk == g:
    return one(w, u, v)

  def body(i, out):
    # The last chunk starts at g − chunk and may redo a few matrices of the one before: same inputs,
    # same values. Slicing only the chunk copies only it (slicing off a remainder copies the stack).
    start = jnp.minimum(i * chunk, g - chunk)
    res = one(*(jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in (w, u, v)))
    return tuple(jax.lax.dynamic_update_slice_in_dim(o, r, start, 0) for o, r in zip(out, res, strict=True))
  return jax.lax.fori_loop(0, -(-g // chunk), body, (jnp.zeros((g,), w.dtype), jnp.zeros_like(u), jnp.zeros_like(v)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _iterate_and_sigma(w: jax.Array, u: jax.Array, v: jax.Array, num_iter: int):
  return _iterate_stack(w, u, v, num_iter)


def _iterate_and_sigma_fwd(w, u, v, num_iter):
  sigma, u, v = _iterate_stack(w, u, v, num_iter)
  return (sigma, u, v), (u, v)


def _iterate_and_sigma_bwd(num_iter, res, cotangents):
  u, v = res
  g_sigma = cotangents[0]
  return (g_sigma[:, None, None] * v[:, :, None] * u[:, None, :], jnp.zeros_like(u), jnp.zeros_like(v))


_iterate_and_sigma.defvjp(_iterate_and_sigma_fwd, _iterate_and_sigma_bwd)


def _power_iterate(matrices, uvs, num_iter: int) -> list[tuple[jax.Array, jax.Array]]:
  """`num_iter` power iterations of every matrix stack (held fixed)."""
  return [_iterate_stack(m, u, v, num_iter)[1:] for (_, m, _, _), (u, v) in zip(matrices, uvs, strict=True)]


def init_spectral_state(key: jax.Array, normalized_weights: Mapping[str, Any], num_iter: int = 40):
  """Random u, v per weight shape, refined by `num_iter` (10 × 4 in the reference) iterations.

  The random starts of every shape come from one draw: on CPU each random call is a loop of its own,
  and one call per shape made this function's compile take seconds.
  """
  matrices = _weight_matrices(normalized_weights)
  counts: dict[str, tuple] = {}
  for shape, m, _, _ in matrices:
    n, cols, rows = counts.get(shape, (0, m.shape[1], m.shape[2]))
    counts[shape] = (n + m.shape[0], cols, rows)
  counts = dict(sorted(counts.items()))
  sizes = [s for n, cols, rows in counts.values() for s in (n * rows, n * cols)]
  draws = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1]) if sizes else []
  state = {}
  for i, (shape, (n, cols, rows)) in enumerate(counts.items()):
    state[shape] = {"u": _normalize(draws[2 * i].reshape(n, rows)),
                    "v": _normalize(draws[2 * i + 1].reshape(n, cols))}
  return _join_state(matrices, _power_iterate(matrices, _split_state(matrices, state), num_iter))


def spectral_norm_penalty(normalized_weights: Mapping[str, Any], state: Mapping[str, Any], num_iter: int = 4):
  """Σ over all convs of σ_max(W) ≈ uᵀWv, with u, v advanced by `num_iter` power iterations.

  Returns (penalty, new_state). σ is differentiable in W; u and v are held fixed.
  """
  matrices = _weight_matrices(normalized_weights)
  total, uvs = 0.0, []
  for (_, m, _, _), (u, v) in zip(matrices, _split_state(matrices, state), strict=True):
    sigma, u, v = _iterate_and_sigma(m, u, v, num_iter)
    total = total + jnp.sum(sigma)
    uvs.append((u, v))
  return total, _join_state(matrices, uvs)


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
