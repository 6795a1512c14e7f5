"""Optax pieces the reference needs (VAEBM_SPEC.md §3.2, §5.7, §9.10)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class TorchAdamaxState(NamedTuple):
  count: jax.Array
  exp_avg: optax.Updates
  exp_inf: optax.Updates


def scale_by_torch_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3) -> optax.GradientTransformation:
  """Adamax with PyTorch semantics: u = max(β₂u, |g| + eps); update = m / ((1 − β₁^t) u).

  optax.adamax adds eps to the denominator instead, which differs at NVAE's eps = 1e-3.
  """

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return TorchAdamaxState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    exp_avg = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.exp_avg, updates)
    exp_inf = jax.tree.map(lambda u, g: jnp.maximum(b2 * u, jnp.abs(g) + eps), state.exp_inf, updates)
    correction = 1 - b1 ** count.astype(jnp.float32)
    new_updates = jax.tree.map(lambda m, u: m / (correction * u), exp_avg, exp_inf)
    return new_updates, TorchAdamaxState(count, exp_avg, exp_inf)

  return optax.GradientTransformation(init_fn, update_fn)


def nvae_learning_rate(base_lr: float, min_lr: float, steps_per_epoch: int, epochs: int,
                       warmup_epochs: float):
  """Linear warm-up from 0 over `warmup_epochs` (per step), then cosine annealing stepped once per
  epoch with T_max = epochs − warmup − 1 and η_min = `min_lr` (NVAE's train.py)."""
  warmup_steps = max(int(warmup_epochs * steps_per_epoch), 1)
  t_max = max(epochs - warmup_epochs - 1, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    epoch = jnp.floor(step / steps_per_epoch)
    cosine_count = jnp.clip(epoch - warmup_epochs, 0, t_max)
    cosine = min_lr + (base_lr - min_lr) * (1 + jnp.cos(math.pi * cosine_count / t_max)) / 2
    return jnp.where(step < warmup_steps, base_lr * step / warmup_steps, cosine)

  return schedule


def nvae_optimizer(learning_rate, weight_decay: float = 3e-4, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-3) -> optax.GradientTransformation:
  """NVAE's Adamax with coupled L2 weight decay (PyTorch adds wd·θ to the gradient)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      scale_by_torch_adamax(b1, b2, eps),
      optax.scale_by_learning_rate(learning_rate),
  )


def igebm_clip(inner: optax.GradientTransformation, b2: float = 0.999) -> optax.GradientTransformation:
  """IGEBM's per-element gradient clip in front of an Adam-based `inner` (VAEBM_SPEC.md §3.2).

  Every element is clamped to ±(3·sqrt(v̂) + 0.1) with v̂ = ν/(1 − β₂^t) read from `inner`'s Adam
  state *before* this step; the clip is skipped at the first step (t = 0). It acts on the raw
  gradient, so it must come before any weight decay inside `inner`.
  """

  def init_fn(params):
    return inner.init(params)

  def update_fn(updates, state, params=None):
    count = optax.tree_utils.tree_get(state, "count")
    nu = optax.tree_utils.tree_get(state, "nu")
    correction = 1.0 - b2 ** jnp.maximum(count, 1).astype(jnp.float32)
    bound = jax.tree.map(lambda v: 3.0 * jnp.sqrt(v / correction) + 0.1, nu)
    clipped = jax.tree.map(lambda g, b: jnp.where(count >= 1, jnp.clip(g, -b, b), g), updates, bound)
    return inner.update(clipped, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def ebm_optimizer(learning_rate: float, weight_decay: float = 3e-5, b1: float = 0.99, b2: float = 0.999,
                  eps: float = 1e-8, clip: bool = True) -> optax.GradientTransformation:
  """VAEBM's EBM optimiser: [IGEBM clip →] coupled L2 → Adam(0.99, 0.999) → constant lr (§9.10)."""
  adam = optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(b1, b2, eps),
                     optax.scale_by_learning_rate(learning_rate))
  return igebm_clip(adam, b2) if clip else adam
