"""A small MLP VAE and an MLP energy for low-dimensional data (the 2-D 25-Gaussians experiment).

The MLP VAE has one latent group z ∈ ℝ^d with prior N(0, I), a Gaussian encoder q(z|x) and a
Gaussian decoder p(x|z) = N(μ(z), σ(z)) on ℝ^D (no clipping, no σ floor). Its Normals follow the
NVAE's conventions (soft-clamped μ and log σ, σ + 0.01) so one `distributions.Normal` serves both.
It implements `interface.LikelihoodVAE` and the NVAE's ELBO interface (`__call__` → `ElboOutput`,
`decoder_distribution`, `groups`), so the stage-1 loop, the ε-space sampler and the likelihood
metrics run on it unchanged.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vaebm_jax.models import distributions
from vaebm_jax.models.nvae import ElboOutput


@flax.struct.dataclass
class VectorGaussianDecoder:
  """p(x|z) = N(μ, σ) per coordinate on ℝ^D; logits = (μ̃, s̃) on the last axis."""
  logits: jax.Array

  @property
  def dist(self) -> distributions.Normal:
    return distributions.Normal.from_params(*distributions.split_channels(self.logits))

  def log_prob(self, x: jax.Array) -> jax.Array:
    return self.dist.log_p(x)

  def sample_given_eps(self, eps: jax.Array) -> jax.Array:
    return self.dist.sample_given_eps(eps)

  def sample(self, key: jax.Array, temperature: float = 1.0) -> jax.Array:
    del temperature
    return self.sample_given_eps(jax.random.normal(key, self.dist.mu.shape, self.logits.dtype))

  def mean(self) -> jax.Array:
    return self.dist.mu


class MLP(nn.Module):
  features: Sequence[int]
  out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for f in self.features:
      x = nn.swish(nn.Dense(f)(x))
    return nn.Dense(self.out)(x)


class MLPVAE(nn.Module):
  """VAE for vectors x ∈ ℝ^data_dim with a latent z ∈ ℝ^latent_dim."""
  data_dim: int = 2
  latent_dim: int = 2
  hidden: int = 256
  num_layers: int = 3

  @property
  def image_shape(self) -> tuple[int, ...]:
    return (self.data_dim,)

  @property
  def groups(self) -> list[int]:
    return [1]

  @property
  def num_groups(self) -> int:
    return 1

  def latent_shapes(self) -> list[tuple[int, ...]]:
    return [(self.latent_dim,)]

  def setup(self):
    self.encoder = MLP([self.hidden] * self.num_layers, 2 * self.latent_dim)
    self.decoder = MLP([self.hidden] * self.num_layers, 2 * self.data_dim)

  def __call__(self, x: jax.Array, train: bool = True, eps: Optional[Sequence[jax.Array]] = None) -> ElboOutput:
    """ELBO path: q(z|x), one z, the decoder logits; analytic KL to N(0, I)·1.01 (as the NVAE's top group)."""
    del train
    q = distributions.Normal.from_params(*distributions.split_channels(self.encoder(x)))
    e = eps[0] if eps is not None else jax.random.normal(self.make_rng("sample"), q.mu.shape)
    z = q.sample_given_eps(e)
    p = distributions.standard_normal_prior(z.shape, z.dtype)
    log_q, log_p = jnp.sum(q.log_p(z), -1), jnp.sum(p.log_p(z), -1)
    kl = jnp.sum(q.kl(p), -1)
    return ElboOutput(self.decoder(z), log_q, log_p, [kl], [jnp.mean(q.kl(p), 0)])

  def sample_from_eps(self, eps_z: Sequence[jax.Array], temperature: float = 1.0, train: bool = False):
    del train
    p = distributions.standard_normal_prior(eps_z[0].shape, eps_z[0].dtype, temperature)
    z = p.sample_given_eps(eps_z[0])
    return self.decoder(z), [z], jnp.sum(p.log_p(z), -1)

  @nn.nowrap
  def decoder_distribution(self, logits: jax.Array) -> VectorGaussianDecoder:
    return VectorGaussianDecoder(logits)

  @nn.nowrap
  def decode_from_eps(self, variables: Any, eps_z: Sequence[jax.Array], eps_x: jax.Array,
                      temperature: float = 1.0) -> dict[str, jax.Array]:
    """T_θ(ε): x = μ(z) + σ(z) ε_x with z = 1.01·t·ε_z (see `interface.ReparameterizedVAE`)."""
    logits, z, log_p_z = self.apply(variables, eps_z, temperature, False, method=MLPVAE.sample_from_eps)
    dist = VectorGaussianDecoder(logits)
    x = dist.sample_given_eps(eps_x)
    return {"logits": logits, "x": x, "mean": dist.mean(), "log_p_z": log_p_z,
            "log_p_x_given_z": jnp.sum(dist.log_prob(x), -1), "z": z}

  @nn.nowrap
  def log_importance_weight(self, variables: Any, x: jax.Array, key: jax.Array) -> jax.Array:
    out = self.apply(variables, x, False, rngs={"sample": key})
    return jnp.sum(VectorGaussianDecoder(out.logits).log_prob(x), -1) + out.log_p - out.log_q


class MLPEnergy(nn.Module):
  """E(x) ∈ ℝ for vectors: an MLP with LipSwish activations and a linear head.

  The hidden layers' kernels are sown into 'normalized_weights' (as 1×1 conv kernels), so VAEBM's
  spectral regulariser α_s·Σσ_max(W) covers them as it covers the conv energies' convs (§3.1; the
  head is left out, as the reference leaves out its Linear).
  """
  hidden: int = 256
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      dense = nn.Dense(self.hidden, name=f"dense_{i}")
      x = dense(x)
      self.sow("normalized_weights", f"kernel_{i}", dense.variables["params"]["kernel"][None, None])
      x = nn.swish(x) / 1.1
    return nn.Dense(1, name="head")(x)[:, 0]
