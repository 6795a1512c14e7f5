"""Objective and optimiser pieces against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vaebm_jax import objectives, optim


def test_kl_warmup_schedule():
  total = 10_000
  np.testing.assert_allclose(objectives.kl_coefficient(0, total), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(objectives.kl_coefficient(1501, total), (1501 - 1) / 3000, rtol=1e-6)
  assert float(objectives.kl_coefficient(3001, total)) == 1.0


def test_kl_balancer_coefficients_square_rule():
  # 2 scales: finest first in groups_per_scale; top scale (i=0) gets 1/G_top, next 4/G_fine.
  alpha = objectives.kl_balancer_coefficients([4, 2], "square")
  np.testing.assert_allclose(alpha, np.array([0.5, 0.5, 1, 1, 1, 1]) / 0.5)


def test_balanced_kl_only_while_warming_up():
  kl_all = [jnp.array([1.0, 3.0]), jnp.array([10.0, 30.0])]
  alpha = np.array([1.0, 1.0], np.float32)
  kl, coeff, vals = objectives.balanced_kl(kl_all, 0.5, alpha)
  c = np.array([2.01, 20.01])
  c = c * c.sum()
  c = c / c.mean()
  np.testing.assert_allclose(coeff, c, rtol=1e-5)
  np.testing.assert_allclose(kl, 0.5 * (np.array([1.0, 3.0]) * c[0] + np.array([10.0, 30.0]) * c[1]), rtol=1e-5)
  kl1, coeff1, _ = objectives.balanced_kl(kl_all, 1.0, alpha)
  np.testing.assert_allclose(coeff1, [1.0, 1.0])
  np.testing.assert_allclose(kl1, [11.0, 33.0])
  np.testing.assert_allclose(vals, [2.0, 20.0])


def test_spectral_penalty_converges_to_largest_singular_values():
  key = jax.random.key(0)
  w1 = jax.random.normal(key, (3, 3, 4, 8))
  w2 = jax.random.normal(jax.random.fold_in(key, 1), (3, 3, 4, 8))
  w3 = jax.random.normal(jax.random.fold_in(key, 2), (1, 1, 8, 5))
  sown = {"a": {"kernel": (w1,)}, "b": {"kernel": (w2,)}, "c": {"kernel": (w3,)}}
  state = objectives.init_spectral_state(jax.random.key(1), sown, num_iter=200)
  penalty, _ = objectives.spectral_norm_penalty(sown, state, num_iter=4)
  expected = sum(np.linalg.svd(np.asarray(w).transpose(3, 2, 0, 1).reshape(w.shape[3], -1), compute_uv=False)[0]
                 for w in (w1, w2, w3))
  np.testing.assert_allclose(penalty, expected, rtol=1e-3)
  # σ = uᵀWv is differentiable in W with u, v fixed: its gradient is u vᵀ, of unit Frobenius norm
  g = jax.grad(lambda w: objectives.spectral_norm_penalty({"c": {"kernel": (w,)}},
                                                          {k: v for k, v in state.items() if k == "5x8"})[0])(w3)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(g)), 1.0, rtol=1e-3)


def test_spectral_state_keeps_the_reference_layout():
  """u, v per shape as the reference keeps them: rows of W viewed (C_out, C_in·kh·kw) in OIHW order,
  stacked in sorted kernel-name order (scanned kernels row by row); four power iterations as NVAE's
  `spectral_norm_parallel` runs them, here in numpy on the reference's matrices."""
  key = jax.random.key(3)
  stacked = jax.random.normal(key, (2, 3, 3, 4, 6))                        # a scanned module: 2 kernels
  single = jax.random.normal(jax.random.fold_in(key, 1), (3, 3, 4, 6))
  sown = {"b": {"kernel": (single,)}, "a": {"kernel": (stacked,)}}
  state = objectives.init_spectral_state(jax.random.key(1), sown, num_iter=3)
  penalty, new = objectives.spectral_norm_penalty(sown, state, num_iter=4)

  w = np.concatenate([np.asarray(stacked), np.asarray(single)[None]])        # "a" before "b"
  w = w.transpose(0, 4, 3, 1, 2).reshape(3, 6, 36)                           # OIHW, then (C_out, C_in·k·k)
  u, v = np.asarray(state["6x36"]["u"], np.float64), np.asarray(state["6x36"]["v"], np.float64)
  unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-3)
  for _ in range(4):
    v = unit(np.einsum("nr,nrc->nc", u, w))
    u = unit(np.einsum("nrc,nc->nr", w, v))
  np.testing.assert_allclose(new["6x36"]["u"], u, atol=2e-5)
  np.testing.assert_allclose(new["6x36"]["v"], v, atol=2e-5)
  np.testing.assert_allclose(penalty, np.einsum("nr,nrc,nc->", u, w, v), rtol=1e-5)
  penalty0, _ = objectives.spectral_norm_penalty(sown, new, num_iter=0)           # σ from the state's u, v
  np.testing.assert_allclose(penalty0, np.einsum("nr,nrc,nc->", u, w, v), rtol=1e-5)


def test_spectral_penalty_in_cache_sized_chunks_matches_the_whole_stack(monkeypatch):
  """Stacks larger than `_CHUNK_BYTES` are iterated a few matrices at a time, the last chunk overlapping
  the one before when the stack does not divide: u, v, σ and σ's gradient (u vᵀ, u and v fixed) as when
  the whole stack is iterated at once."""
  key = jax.random.key(5)
  stacked = jax.random.normal(key, (7, 3, 3, 4, 6))              # 7 matrices of 36 × 6: chunks 3, 3, 1(+2)
  single = jax.random.normal(jax.random.fold_in(key, 1), (1, 1, 6, 5))
  sown = {"a": {"kernel": (stacked,)}, "b": {"kernel": (single,)}}
  state = objectives.init_spectral_state(jax.random.key(2), sown, num_iter=2)

  def run():
    (penalty, new), grads = jax.value_and_grad(
        lambda s: objectives.spectral_norm_penalty(s, state, num_iter=4), has_aux=True)(sown)
    return penalty, new, grads

  whole = run()
  monkeypatch.setattr(objectives, "_CHUNK_BYTES", 3 * 36 * 6 * 4)
  chunked = run()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), whole, chunked)
  # σ's gradient is v uᵀ for each matrix (kernel layout (k·k·C_in, C_out)): the fixed vectors' outer product
  u, v = chunked[1]["6x36"]["u"][:7], objectives._to_ours(chunked[1]["6x36"]["v"][:7], 3, 4)
  np.testing.assert_allclose(chunked[2]["a"]["kernel"][0].reshape(7, 36, 6), np.einsum("gk,go->gko", v, u),
                             rtol=1e-5, atol=1e-7)


def test_torch_adamax_formula():
  """u = max(β₂u, |g| + eps); θ -= lr/(1 − β₁^t) · m/u, with coupled weight decay."""
  tx = optim.nvae_optimizer(0.1, weight_decay=0.01, eps=1e-3)
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  state = tx.init(params)
  m = np.zeros(3)
  u = np.zeros(3)
  theta = np.array([1.0, -2.0, 0.5])
  for t, g in enumerate([np.array([0.1, -0.3, 0.0]), np.array([-0.2, 0.5, 1e-4])], start=1):
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    g = g + 0.01 * theta
    m = 0.9 * m + 0.1 * g
    u = np.maximum(0.999 * u, np.abs(g) + 1e-3)
    theta = theta - 0.1 / (1 - 0.9 ** t) * m / u
  np.testing.assert_allclose(params["w"], theta, rtol=1e-5)


def test_learning_rate_warmup_then_cosine_per_epoch():
  schedule = optim.nvae_learning_rate(1e-2, 1e-4, steps_per_epoch=10, epochs=12, warmup_epochs=2)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(10), 5e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(25), 1e-2, rtol=1e-6)              # epoch 2: cosine step 0
  np.testing.assert_allclose(schedule(30), schedule(39), rtol=1e-6)      # constant within an epoch
  np.testing.assert_allclose(schedule(119), 1e-4 + (1e-2 - 1e-4) * (1 + np.cos(np.pi * 9 / 9)) / 2, rtol=1e-5)


def _gaussian_logits(mu: float, log_sigma: float, shape=(2, 4, 4, 1)):
  """Decoder logits whose soft-clamped mean is `mu` and whose soft-clamped log σ is `log_sigma`."""
  raw = lambda v: 5.0 * np.arctanh(v / 5.0)
  return jnp.concatenate([jnp.full(shape, raw(mu)), jnp.full(shape, raw(log_sigma))], axis=-1)


def test_stage1_reconstruction_uses_nvae_density_without_floor():
  """NVAE trains on log N(2x − 1; μ, σ) with no floor (SPEC §1.3 item 5, §5.5): a decoder that is
  sharper than VAEBM's σ' ≥ 0.145 floor on the right mean must get the higher likelihood."""
  from vaebm_jax.models import distributions
  x = jnp.full((2, 4, 4, 1), 0.75)                       # 2x − 1 = 0.5 = the decoder mean
  sharp = distributions.NormalDecoder(_gaussian_logits(0.5, -4.0))      # σ = e^−4 + 0.01 ≈ 0.028
  at_floor = distributions.NormalDecoder(_gaussian_logits(0.5, -2.0))   # σ = e^−2 + 0.01 ≈ 0.145
  ll_sharp = objectives.reconstruction_log_prob(sharp, x)
  ll_floor = objectives.reconstruction_log_prob(at_floor, x)
  assert np.all(ll_sharp > ll_floor + 16 * 1.5)          # log(0.145/0.028) ≈ 1.64 nats per pixel
  sigma = np.exp(-4.0) + 0.01
  np.testing.assert_allclose(ll_sharp, 16 * (-0.5 * np.log(2 * np.pi) - np.log(sigma)), rtol=1e-5)
  # The stage-2 potential keeps VAEBM's floor: both decoders have the same floored density there.
  np.testing.assert_allclose(jnp.sum(sharp.floored_log_prob(x), axis=(1, 2, 3)),
                             jnp.sum(at_floor.floored_log_prob(x), axis=(1, 2, 3)), rtol=1e-5)
  # Below the floor the stage-1 gradient still pushes log σ down (with the floor it was exactly 0).
  grad = jax.grad(lambda l: jnp.sum(objectives.reconstruction_log_prob(distributions.NormalDecoder(l), x)))(
      _gaussian_logits(0.5, -3.0))
  assert np.all(np.asarray(grad[..., 1:]) < 0)
