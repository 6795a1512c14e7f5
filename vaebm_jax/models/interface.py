"""What VAEBM's sampler needs from a VAE (VAEBM_SPEC.md §1.2–§1.4), and what its likelihood
estimates need. The NVAE (`models.nvae.NVAE`) and the MLP VAE of the 2-D experiment
(`models.mlp.MLPVAE`) implement both; other JAX code can bring its own VAE.

A `ReparameterizedVAE` is a static (hashable) object — a Flax Linen module works — with:

- `image_shape`: shape of one data point, e.g. (H, W, C) or (2,); ε_x has this shape.
- `latent_shapes()`: the shape of each latent group's noise ε_z (one sample), top group first.
- `decode_from_eps(variables, eps_z, eps_x, temperature) -> dict`: the deterministic map T_θ(ε) of
  §1.2, batched on axis 0, with these entries (each per sample unless noted):
    `x`                 the sample the energy network sees (for the NVAE: (clip(μ + σ ε_x, −1, 1) + 1)/2),
    `mean`              the decoder mean (what samples report at test time, §1.5), same shape as `x`,
    `log_p_z`           Σ log p(z) over groups and dims, (B,),
    `log_p_x_given_z`   log p(x|z) of `x` as the potential uses it (the NVAE's has VAEBM's σ floor), (B,).
  Every term must be differentiable in ε; the VAE is frozen (eval-mode normalisation).

A `LikelihoodVAE` also has
- `log_importance_weight(variables, x, key) -> (B,)`: log p(x|z) + log p(z) − log q(z|x) for one
  posterior sample z ~ q(z|x), with the model's own (training) density p(x|z). The mean over K draws
  of its exp is an unbiased estimate of p(x) (`metrics.likelihood`).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import jax

DECODE_KEYS = ("x", "mean", "log_p_z", "log_p_x_given_z")


@runtime_checkable
class ReparameterizedVAE(Protocol):
  @property
  def image_shape(self) -> tuple[int, ...]: ...

  def latent_shapes(self) -> Sequence[tuple[int, ...]]: ...

  def decode_from_eps(self, variables: Any, eps_z: Sequence[jax.Array], eps_x: jax.Array,
                      temperature: float = 1.0) -> dict[str, jax.Array]: ...


@runtime_checkable
class LikelihoodVAE(ReparameterizedVAE, Protocol):
  def log_importance_weight(self, variables: Any, x: jax.Array, key: jax.Array) -> jax.Array: ...


def decoder_variables(vae: ReparameterizedVAE, variables: Any) -> Any:
  """What `vae.decode_from_eps` needs of `variables`: `vae.decoder_variables(variables)` where the VAE
  offers it (the NVAE drops its encoder), else all of them. Stage 2 only decodes."""
  select = getattr(vae, "decoder_variables", None)
  return select(variables) if select is not None else variables


def check_vae(vae: Any) -> ReparameterizedVAE:
  """Returns `vae` if it implements `ReparameterizedVAE`, else one clear TypeError."""
  missing = [name for name in ("image_shape", "latent_shapes", "decode_from_eps") if not hasattr(vae, name)]
  if missing:
    raise TypeError(f"{type(vae).__name__} is not a ReparameterizedVAE: it lacks {', '.join(missing)} "
                    f"(see vaebm_jax.models.interface)")
  return vae
