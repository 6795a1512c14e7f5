"""Output and latent distributions of NVAE (VAEBM_SPEC.md §1.3, §5.5), NHWC.

Every Normal soft-clamps its mean to (−5, 5) and its log σ to (−5, 5) and adds 0.01 to σ.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

LOG_2PI = math.log(2 * math.pi)


def soft_clamp5(x: jax.Array) -> jax.Array:
  return 5.0 * jnp.tanh(x / 5.0)


@flax.struct.dataclass
class Normal:
  mu: jax.Array
  sigma: jax.Array

  @classmethod
  def from_params(cls, mu: jax.Array, log_sigma: jax.Array, temperature: float = 1.0,
                  log_sigma_floor: float | None = None) -> "Normal":
    log_sigma = soft_clamp5(log_sigma)
    if log_sigma_floor is not None:
      log_sigma = jnp.maximum(log_sigma, log_sigma_floor)
    sigma = jnp.exp(log_sigma) + 1e-2
    return cls(soft_clamp5(mu), sigma * temperature)

  def sample_given_eps(self, eps: jax.Array) -> jax.Array:
    return eps * self.sigma + self.mu

  def log_p(self, x: jax.Array) -> jax.Array:
    normalized = (x - self.mu) / self.sigma
    return -0.5 * normalized * normalized - 0.5 * LOG_2PI - jnp.log(self.sigma)

  def kl(self, other: "Normal") -> jax.Array:
    term1 = (self.mu - other.mu) / other.sigma
    term2 = self.sigma / other.sigma
    return 0.5 * (term1 * term1 + term2 * term2) - 0.5 - jnp.log(term2)


def standard_normal_prior(shape, dtype=jnp.float32, temperature: float = 1.0) -> Normal:
  """The top group's prior: N(0, 1.01·t) (σ = exp(0) + 0.01)."""
  return Normal.from_params(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), temperature)


def split_channels(params: jax.Array):
  c = params.shape[-1] // 2
  return params[..., :c], params[..., c:]


# ----------------------------------------------------------------------------------------------
# Decoders. Each maps the image head's logits to: log_prob(x in [0,1]) per pixel and channel,
# sample(key or eps) in [0,1], mean() in the [−1,1]-free model space mapped to [0,1].
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class NormalDecoder:
  """Per-pixel Gaussian on [−1, 1] (what VAEBM uses, `num_mixture_dec` = 1).

  Two densities (VAEBM_SPEC.md §1.3 item 5, §5.5):
  - `log_prob`: NVAE's own, log N(2x − 1; μ_x, σ_x) with no floor: the stage-1 training objective,
    the test NELBO and the VAE's likelihood estimates.
  - `floored_log_prob`: VAEBM's, with log σ' = max(softclamp5(s̃_x), −2), so σ' ≥ 0.145 (its `dist1`):
    only the stage-2 Langevin potential uses it. Training stage 1 on it caps the μ-gradient of the
    reconstruction and never pushes σ_x below 0.145.
  Sampling uses σ_x in both cases.
  """
  logits: jax.Array

  @property
  def dist(self) -> Normal:
    return Normal.from_params(*split_channels(self.logits))

  @property
  def floored_dist(self) -> Normal:
    return Normal.from_params(*split_channels(self.logits), log_sigma_floor=-2.0)

  def log_prob(self, x: jax.Array) -> jax.Array:
    """NVAE's density of 2x − 1 per pixel and channel, σ_x unfloored (stage 1)."""
    return self.dist.log_p(2.0 * x - 1.0)

  def floored_log_prob(self, x: jax.Array) -> jax.Array:
    """VAEBM's density of 2x − 1 with σ' ≥ e^−2 + 0.01 (the stage-2 potential, §1.3 item 5)."""
    return self.floored_dist.log_p(2.0 * x - 1.0)

  def sample_given_eps(self, eps: jax.Array) -> jax.Array:
    return (jnp.clip(self.dist.sample_given_eps(eps), -1.0, 1.0) + 1.0) / 2.0

  def sample(self, key: jax.Array, temperature: float = 1.0) -> jax.Array:
    del temperature  # NVAE's NormalDecoder ignores the temperature (NVAE PR #55).
    return self.sample_given_eps(jax.random.normal(key, self.dist.mu.shape, self.logits.dtype))

  def mean(self) -> jax.Array:
    """μ_x/2 + 1/2, not clipped (§1.5)."""
    return self.dist.mu / 2.0 + 0.5


@flax.struct.dataclass
class BernoulliDecoder:
  logits: jax.Array

  def log_prob(self, x: jax.Array) -> jax.Array:
    return x * jax.nn.log_sigmoid(self.logits) + (1.0 - x) * jax.nn.log_sigmoid(-self.logits)

  def sample(self, key: jax.Array, temperature: float = 1.0) -> jax.Array:
    del temperature
    return jax.random.bernoulli(key, jax.nn.sigmoid(self.logits)).astype(self.logits.dtype)

  def mean(self) -> jax.Array:
    return jax.nn.sigmoid(self.logits)


@flax.struct.dataclass
class DiscMixLogistic:
  """Discretised logistic mixture with autoregressive channels (§5.5), RGB only.

  Logit layout (per pixel, last axis): M mixture logits, then (3, 3M) = means, log scales and
  coefficients per colour, following the reference's (B, 3, 3M, H, W) view.
  """
  logits: jax.Array
  num_mix: int = flax.struct.field(pytree_node=False, default=10)
  num_bits: int = flax.struct.field(pytree_node=False, default=8)

  def _params(self):
    m = self.num_mix
    b, h, w, _ = self.logits.shape
    logit_probs = self.logits[..., :m]                                    # B,H,W,M
    rest = self.logits[..., m:].reshape(b, h, w, 3, 3 * m)                # B,H,W,3,3M
    means = rest[..., :m]
    log_scales = jnp.maximum(rest[..., m:2 * m], -7.0)
    coeffs = jnp.tanh(rest[..., 2 * m:3 * m])
    return logit_probs, means, log_scales, coeffs

  def log_prob(self, x: jax.Array) -> jax.Array:
    """Per-pixel log-probability (B, H, W), summed over colours."""
    logit_probs, means, log_scales, coeffs = self._params()
    max_val = 2.0 ** self.num_bits - 1
    x = 2.0 * x - 1.0
    xs = x[..., None]                                                     # B,H,W,3,1
    mean_r = means[..., 0, :]
    mean_g = means[..., 1, :] + coeffs[..., 0, :] * xs[..., 0, :]
    mean_b = means[..., 2, :] + coeffs[..., 1, :] * xs[..., 0, :] + coeffs[..., 2, :] * xs[..., 1, :]
    centered = xs - jnp.stack([mean_r, mean_g, mean_b], axis=-2)          # B,H,W,3,M
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / max_val)
    min_in = inv_stdv * (centered - 1.0 / max_val)
    cdf_delta = jax.nn.sigmoid(plus_in) - jax.nn.sigmoid(min_in)
    log_cdf_plus = plus_in - jax.nn.softplus(plus_in)
    log_one_minus_cdf_min = -jax.nn.softplus(min_in)
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * jax.nn.softplus(mid_in)
    log_prob_mid = jnp.where(cdf_delta > 1e-5, jnp.log(jnp.maximum(cdf_delta, 1e-10)),
                             log_pdf_mid - math.log(max_val / 2))
    log_probs = jnp.where(xs < -0.999, log_cdf_plus, jnp.where(xs > 0.99, log_one_minus_cdf_min, log_prob_mid))
    log_probs = jnp.sum(log_probs, axis=-2) + jax.nn.log_softmax(logit_probs, axis=-1)
    return jax.scipy.special.logsumexp(log_probs, axis=-1)

  def sample(self, key: jax.Array, temperature: float = 1.0) -> jax.Array:
    logit_probs, means, log_scales, coeffs = self._params()
    k1, k2 = jax.random.split(key)
    gumbel = -jnp.log(-jnp.log(jax.random.uniform(k1, logit_probs.shape, minval=1e-5, maxval=1 - 1e-5)))
    sel = jax.nn.one_hot(jnp.argmax(logit_probs / temperature + gumbel, axis=-1), self.num_mix)[..., None, :]
    means, log_scales, coeffs = (jnp.sum(a * sel, axis=-1) for a in (means, log_scales, coeffs))
    u = jax.random.uniform(k2, means.shape, minval=1e-5, maxval=1 - 1e-5)
    x = means + jnp.exp(log_scales) / temperature * (jnp.log(u) - jnp.log(1.0 - u))
    x0 = jnp.clip(x[..., 0], -1, 1)
    x1 = jnp.clip(x[..., 1] + coeffs[..., 0] * x0, -1, 1)
    x2 = jnp.clip(x[..., 2] + coeffs[..., 1] * x0 + coeffs[..., 2] * x1, -1, 1)
    return jnp.stack([x0, x1, x2], axis=-1) / 2.0 + 0.5

  def mean(self) -> jax.Array:
    logit_probs, means, _, coeffs = self._params()
    probs = jax.nn.softmax(logit_probs, axis=-1)[..., None, :]
    m = means
    x0 = jnp.clip(m[..., 0, :], -1, 1)
    x1 = jnp.clip(m[..., 1, :] + coeffs[..., 0, :] * x0, -1, 1)
    x2 = jnp.clip(m[..., 2, :] + coeffs[..., 1, :] * x0 + coeffs[..., 2, :] * x1, -1, 1)
    mixed = jnp.sum(jnp.stack([x0, x1, x2], axis=-2) * probs, axis=-1)
    return mixed / 2.0 + 0.5


def decoder_output(decoder: str, logits: jax.Array, num_mix: int = 10, num_bits: int = 8):
  if decoder == "normal":
    return NormalDecoder(logits)
  if decoder == "bernoulli":
    return BernoulliDecoder(logits)
  if decoder == "dml":
    return DiscMixLogistic(logits, num_mix, num_bits)
  raise ValueError(f"decoder must be 'normal', 'bernoulli' or 'dml', got {decoder!r}")


def decoder_channels(decoder: str, image_channels: int, num_mix: int = 10) -> int:
  if decoder == "normal":
    return 2 * image_channels
  if decoder == "bernoulli":
    return image_channels
  if decoder == "dml":
    if image_channels != 3:
      raise ValueError("the discretized logistic mixture decoder needs RGB images (3 channels)")
    return 10 * num_mix
  raise ValueError(f"decoder must be 'normal', 'bernoulli' or 'dml', got {decoder!r}")
