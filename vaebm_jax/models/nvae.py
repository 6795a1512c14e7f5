"""NVAE (Vahdat & Kautz 2020) as VAEBM uses it (VAEBM_SPEC.md §5), Flax Linen, NHWC.

`NVAE.__call__` is the ELBO path (encoder + decoder); `NVAE.sample_from_eps` is the prior path,
the deterministic map T_θ of §1.3 from standard-normal noise to latents and decoder logits.
`decode_from_eps` wraps it in eval-mode BN, which is what stage 2 differentiates through.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vaebm_jax.models import distributions
from vaebm_jax.models.layers import ARCH_CELLS, Cell, Conv2D

CHANNEL_MULT = 2


def groups_per_scale(num_scales: int, num_groups: int, ada_groups: bool, min_groups: int = 1) -> list[int]:
  """Groups per scale, finest scale first; halved per coarser scale with `ada_groups`."""
  groups, n = [], num_groups
  for _ in range(num_scales):
    if n < 1:
      raise ValueError("num_groups_per_scale must be >= 1")
    groups.append(n)
    if ada_groups:
      n = max(min_groups, n // 2)
  return groups


class EncCombinerCell(nn.Module):
  """combine(e, d) = e + Conv1×1(d)."""
  features: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, enc: jax.Array, dec: jax.Array) -> jax.Array:
    return enc + Conv2D(self.features, 1, use_bias=True, conv_impl=self.conv_impl, name="conv")(dec)


class DecCombinerCell(nn.Module):
  """concat(s, z) → Conv1×1 back to C."""
  features: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, s: jax.Array, z: jax.Array) -> jax.Array:
    return Conv2D(self.features, 1, use_bias=True, conv_impl=self.conv_impl, name="conv")(
        jnp.concatenate([s, z], axis=-1))


class CellAR(nn.Module):
  """One volume-preserving autoregressive flow cell (§5.4): z ← z − m(z)."""
  num_z: int
  mirror: bool
  expansion: int = 6
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    hidden = self.num_z * self.expansion
    s = Conv2D(hidden, 3, ar_mask=(True, self.mirror), conv_impl=self.conv_impl, name="convz_0")(z)
    s = nn.elu(s)
    s = Conv2D(hidden, 5, groups=hidden, ar_mask=(False, self.mirror), conv_impl=self.conv_impl,
               name="convz_2")(s)
    s = nn.elu(s)
    mu = Conv2D(self.num_z, 1, use_bias=True, ar_mask=(False, self.mirror), log_norm_offset=math.log(0.1),
                conv_impl=self.conv_impl, name="mu")(nn.elu(s))
    return z - mu


class PairedCellAR(nn.Module):
  num_z: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    z = CellAR(self.num_z, mirror=False, conv_impl=self.conv_impl, name="cell1")(z)
    return CellAR(self.num_z, mirror=True, conv_impl=self.conv_impl, name="cell2")(z)


@flax.struct.dataclass
class ElboOutput:
  logits: jax.Array
  log_q: jax.Array            # (B,) Σ log q(z|x) over groups and dims
  log_p: jax.Array            # (B,) Σ log p(z) over groups and dims
  kl_all: list                # per group, (B,)
  kl_diag: list               # per group, (C_z,) batch mean of the spatial sum


class NVAE(nn.Module):
  """The hierarchical VAE. Constructor arguments mirror the reference's command-line flags."""
  image_size: int = 32
  image_channels: int = 3
  num_channels_enc: int = 16
  num_channels_dec: int = 16
  num_latent_scales: int = 1
  num_groups_per_scale: int = 2
  num_latent_per_group: int = 20
  ada_groups: bool = False
  min_groups_per_scale: int = 1
  num_cell_per_cond_enc: int = 2
  num_cell_per_cond_dec: int = 2
  num_preprocess_blocks: int = 1
  num_preprocess_cells: int = 2
  num_postprocess_blocks: int = 1
  num_postprocess_cells: int = 2
  num_nf: int = 0
  decoder: str = "normal"      # 'normal' (VAEBM), 'dml', 'bernoulli'
  num_mixture_dec: int = 10
  num_x_bits: int = 8
  use_se: bool = True
  res_dist: bool = True
  arch_instance: str = "res_mbconv"
  conv_impl: str = "auto"
  remat_cells: bool = False    # rematerialise cells in the backward pass (saves memory)

  # -------------------------------------------------------------------------------- layout
  @property
  def groups(self) -> list[int]:
    return groups_per_scale(self.num_latent_scales, self.num_groups_per_scale, self.ada_groups,
                            self.min_groups_per_scale)

  @property
  def vanilla_vae(self) -> bool:
    return self.num_latent_scales == 1 and self.num_groups_per_scale == 1

  @property
  def top_spatial(self) -> int:
    return self.image_size // 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

  def latent_shapes(self) -> list[tuple[int, int, int]]:
    """(H, W, C) of each latent group, top (coarsest) group first."""
    shapes = []
    for s in range(self.num_latent_scales):
      size = self.top_spatial * 2 ** s
      shapes += [(size, size, self.num_latent_per_group)] * self.groups[self.num_latent_scales - s - 1]
    return shapes

  @property
  def num_groups(self) -> int:
    return sum(self.groups)

  # -------------------------------------------------------------------------------- modules
  def setup(self):
    if self.image_size % 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1):
      raise ValueError(f"image_size {self.image_size} must be divisible by 2^(num_preprocess_blocks + "
                       f"num_latent_scales - 1)")
    arch = ARCH_CELLS[self.arch_instance]
    impl = self.conv_impl
    cell_cls = nn.remat(Cell, static_argnums=(2,)) if self.remat_cells else Cell

    def cell(features, cell_type):
      return cell_cls(features, cell_type, arch[cell_type], self.use_se, impl)

    c_enc, c_dec = self.num_channels_enc, self.num_channels_dec
    scale = CHANNEL_MULT ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
    self.prior_ftr0 = self.param("prior_ftr0", nn.initializers.uniform(1.0),
                                 (self.top_spatial, self.top_spatial, int(scale * c_dec)))
    self.stem = Conv2D(c_enc, 3, use_bias=True, conv_impl=impl)

    mult = 1
    pre = []
    for _ in range(self.num_preprocess_blocks):
      for c in range(self.num_preprocess_cells):
        if c == self.num_preprocess_cells - 1:
          pre.append(cell(int(CHANNEL_MULT * c_enc * mult), "down_pre"))
          mult *= CHANNEL_MULT
        else:
          pre.append(cell(int(c_enc * mult), "normal_pre"))
    self.pre_process = pre

    enc, enc_kinds = [], []
    if not self.vanilla_vae:
      for s in range(self.num_latent_scales):
        for g in range(self.groups[s]):
          for _ in range(self.num_cell_per_cond_enc):
            enc.append(cell(int(c_enc * mult), "normal_enc"))
            enc_kinds.append("cell")
          if not (s == self.num_latent_scales - 1 and g == self.groups[s] - 1):
            enc.append(EncCombinerCell(int(c_enc * mult), impl))
            enc_kinds.append("combiner")
        if s < self.num_latent_scales - 1:
          enc.append(cell(int(CHANNEL_MULT * c_enc * mult), "down_enc"))
          enc_kinds.append("cell")
          mult *= CHANNEL_MULT
    self.enc_tower = enc
    self._enc_kinds = tuple(enc_kinds)

    self.enc0 = Conv2D(int(c_enc * mult), 1, use_bias=True, conv_impl=impl)

    nz = self.num_latent_per_group
    enc_sampler, dec_sampler, nf_cells = [], [], []
    m = mult
    for s in range(self.num_latent_scales):
      for g in range(self.groups[self.num_latent_scales - s - 1]):
        enc_sampler.append(Conv2D(2 * nz, 3, use_bias=True, conv_impl=impl))
        for _ in range(self.num_nf):
          nf_cells.append(PairedCellAR(nz, impl))
        if not (s == 0 and g == 0):
          dec_sampler.append(Conv2D(2 * nz, 1, use_bias=True, conv_impl=impl))
      m /= CHANNEL_MULT
    self.enc_sampler, self.dec_sampler, self.nf_cells = enc_sampler, dec_sampler, nf_cells

    dec, dec_kinds = [], []
    if self.vanilla_vae:
      self.stem_decoder = Conv2D(int(mult * c_enc), 1, use_bias=True, conv_impl=impl)
    else:
      for s in range(self.num_latent_scales):
        for g in range(self.groups[self.num_latent_scales - s - 1]):
          if not (s == 0 and g == 0):
            for _ in range(self.num_cell_per_cond_dec):
              dec.append(cell(int(c_dec * mult), "normal_dec"))
              dec_kinds.append("cell")
          dec.append(DecCombinerCell(int(c_dec * mult), impl))
          dec_kinds.append("combiner")
        if s < self.num_latent_scales - 1:
          dec.append(cell(int(c_dec * mult / CHANNEL_MULT), "up_dec"))
          dec_kinds.append("cell")
          mult /= CHANNEL_MULT
    self.dec_tower = dec
    self._dec_kinds = tuple(dec_kinds)

    post = []
    for _ in range(self.num_postprocess_blocks):
      for c in range(self.num_postprocess_cells):
        if c == 0:
          post.append(cell(int(c_dec * mult / CHANNEL_MULT), "up_post"))
          mult /= CHANNEL_MULT
        else:
          post.append(cell(int(c_dec * mult), "normal_post"))
    self.post_process = post
    self.image_conditional = Conv2D(
        distributions.decoder_channels(self.decoder, self.image_channels, self.num_mixture_dec), 3,
        use_bias=True, conv_impl=impl)

  # -------------------------------------------------------------------------------- helpers
  def _initial_state(self, batch: int) -> jax.Array:
    return jnp.broadcast_to(self.prior_ftr0[None], (batch,) + self.prior_ftr0.shape)

  def _prior_params(self, idx_dec: int, s: jax.Array):
    return distributions.split_channels(self.dec_sampler[idx_dec - 1](nn.elu(s)))

  def _decode(self, z_top: jax.Array, next_z, train: bool) -> jax.Array:
    """Runs the decoder tower; `next_z(idx_dec, s)` returns the latent of group idx_dec ≥ 1."""
    s = self._initial_state(z_top.shape[0])
    z = z_top
    idx_dec = 0
    for kind, cell in zip(self._dec_kinds, self.dec_tower, strict=True):
      if kind == "combiner":
        if idx_dec > 0:
          z = next_z(idx_dec, s)
        s = cell(s, z)
        idx_dec += 1
      else:
        s = cell(s, train)
    if self.vanilla_vae:
      s = self.stem_decoder(z)
    for cell in self.post_process:
      s = cell(s, train)
    return self.image_conditional(nn.elu(s))

  def _flows(self, z: jax.Array, group: int) -> jax.Array:
    for n in range(self.num_nf):
      z = self.nf_cells[group * self.num_nf + n](z)   # volume preserving: log det = 0
    return z

  def _noise(self, eps, idx: int, shape) -> jax.Array:
    if eps is not None:
      return eps[idx]
    return jax.random.normal(self.make_rng("sample"), shape)

  # -------------------------------------------------------------------------------- ELBO path
  def __call__(self, x: jax.Array, train: bool = True, eps: Optional[Sequence[jax.Array]] = None) -> ElboOutput:
    """Encoder + decoder on images x in [0, 1] (NHWC).

    Args:
      x: images in [0, 1], (B, H, W, C).
      train: BN in train mode (batch statistics, running stats updated) or eval mode.
      eps: optional posterior noise per group (top first); drawn from the 'sample' rng if None.
    """
    s = self.stem(2.0 * x - 1.0)
    for cell in self.pre_process:
      s = cell(s, train)
    combiners, combiner_inputs = [], []
    for kind, cell in zip(self._enc_kinds, self.enc_tower, strict=True):
      if kind == "combiner":
        combiners.append(cell)
        combiner_inputs.append(s)
      else:
        s = cell(s, train)
    combiners.reverse()
    combiner_inputs.reverse()

    ftr = nn.elu(self.enc0(nn.elu(s)))
    mu_q, log_sig_q = distributions.split_channels(self.enc_sampler[0](ftr))
    q = distributions.Normal.from_params(mu_q, log_sig_q)
    z = q.sample_given_eps(self._noise(eps, 0, mu_q.shape))
    log_q_conv = q.log_p(z)
    z = self._flows(z, 0)
    p = distributions.standard_normal_prior(z.shape, z.dtype)
    all_q, all_p = [q], [p]
    all_log_q, all_log_p = [log_q_conv], [p.log_p(z)]

    def next_z(idx_dec, s):
      mu_p, log_sig_p = self._prior_params(idx_dec, s)
      ftr = combiners[idx_dec - 1](combiner_inputs[idx_dec - 1], s)
      mu_q, log_sig_q = distributions.split_channels(self.enc_sampler[idx_dec](ftr))
      if self.res_dist:
        q = distributions.Normal.from_params(mu_p + mu_q, log_sig_p + log_sig_q)
      else:
        q = distributions.Normal.from_params(mu_q, log_sig_q)
      z = q.sample_given_eps(self._noise(eps, idx_dec, mu_q.shape))
      all_log_q.append(q.log_p(z))
      z = self._flows(z, idx_dec)
      all_q.append(q)
      p = distributions.Normal.from_params(mu_p, log_sig_p)
      all_p.append(p)
      all_log_p.append(p.log_p(z))
      return z

    logits = self._decode(z, next_z, train)

    kl_all, kl_diag = [], []
    log_q = log_p = 0.0
    for q, p, lq, lp in zip(all_q, all_p, all_log_q, all_log_p, strict=True):
      kl_per_var = lq - lp if self.num_nf > 0 else q.kl(p)
      kl_diag.append(jnp.mean(jnp.sum(kl_per_var, axis=(1, 2)), axis=0))
      kl_all.append(jnp.sum(kl_per_var, axis=(1, 2, 3)))
      log_q = log_q + jnp.sum(lq, axis=(1, 2, 3))
      log_p = log_p + jnp.sum(lp, axis=(1, 2, 3))
    return ElboOutput(logits, log_q, log_p, kl_all, kl_diag)

  # -------------------------------------------------------------------------------- prior path
  def sample_from_eps(self, eps_z: Sequence[jax.Array], temperature: float = 1.0, train: bool = False):
    """T_θ^z: standard-normal noise per group (top first) → (logits, z per group, Σ log p(z)).

    z_1 = 1.01·t·ε_1; z_l = μ_l + t·σ_l·ε_l with (μ_l, σ_l) from the prior head on the decoder
    state (§1.3). log p(z) uses the same tempered distributions, so its residual equals ε.
    """
    p = distributions.standard_normal_prior(eps_z[0].shape, eps_z[0].dtype, temperature)
    z = p.sample_given_eps(eps_z[0])
    z_list, log_p = [z], jnp.sum(p.log_p(z), axis=(1, 2, 3))

    def next_z(idx_dec, s):
      nonlocal log_p
      p = distributions.Normal.from_params(*self._prior_params(idx_dec, s), temperature)
      z = p.sample_given_eps(eps_z[idx_dec])
      z_list.append(z)
      log_p = log_p + jnp.sum(p.log_p(z), axis=(1, 2, 3))
      return z

    logits = self._decode(z, next_z, train)
    return logits, z_list, log_p

  def decoder_distribution(self, logits: jax.Array):
    return distributions.decoder_output(self.decoder, logits, self.num_mixture_dec, self.num_x_bits)


def sample_latent_noise(key: jax.Array, model: NVAE, batch: int) -> list[jax.Array]:
  """Standard-normal ε_z for every latent group of `model`, top group first."""
  keys = jax.random.split(key, model.num_groups)
  return [jax.random.normal(k, (batch,) + shape) for k, shape in zip(keys, model.latent_shapes(), strict=True)]


def decode_from_eps(model: NVAE, variables: Any, eps_z: Sequence[jax.Array], eps_x: jax.Array,
                    temperature: float = 1.0) -> dict[str, jax.Array]:
  """The deterministic map T_θ(ε_z, ε_x) of VAEBM_SPEC.md §1.3 with eval-mode BN.

  Only for the Gaussian decoder (the one VAEBM uses; the others have no ε-path).

  Returns:
    dict with `logits`; `x` = (clip(μ_x + σ_x ε_x, −1, 1) + 1)/2; `mean` = μ_x/2 + 1/2;
    `log_p_z` = Σ log p(z); `log_p_x_given_z` (σ floored, §1.3 step 5); `z` (list).
  """
  if model.decoder != "normal":
    raise ValueError("decode_from_eps needs the Gaussian decoder (decoder='normal'); the DML and "
                     "Bernoulli decoders have no reparameterised ε_x path (VAEBM_SPEC.md §1.3)")
  logits, z, log_p_z = model.apply(variables, eps_z, temperature, False, method=NVAE.sample_from_eps)
  dist = distributions.NormalDecoder(logits)
  x = dist.sample_given_eps(eps_x)
  return {
      "logits": logits,
      "x": x,
      "mean": dist.mean(),
      "log_p_z": log_p_z,
      "log_p_x_given_z": jnp.sum(dist.log_prob(x), axis=(1, 2, 3)),
      "z": z,
  }


def sample_images(model: NVAE, variables: Any, key: jax.Array, batch: int, temperature: float = 1.0,
                  use_mean: bool = True) -> jax.Array:
  """Ancestral prior samples in [0, 1] with eval-mode BN (decoder mean by default)."""
  k_z, k_x = jax.random.split(key)
  logits, _, _ = model.apply(variables, sample_latent_noise(k_z, model, batch), temperature, False,
                             method=NVAE.sample_from_eps)
  dist = model.decoder_distribution(logits)
  return dist.mean() if use_mean else dist.sample(k_x, temperature)


def readjust_batch_norm(model: NVAE, variables: Any, key: jax.Array, num_iters: int = 500, batch: int = 16,
                        temperature: float = 1.0) -> Any:
  """NVAE's --readjust_bn: re-estimate BN running stats from prior samples in train mode (§5.8)."""

  @jax.jit
  def step(batch_stats, key):
    _, updates = model.apply({**variables, "batch_stats": batch_stats}, sample_latent_noise(key, model, batch),
                             temperature, True, method=NVAE.sample_from_eps, mutable=["batch_stats"])
    return updates["batch_stats"]

  batch_stats = variables["batch_stats"]
  for i in range(num_iters):
    batch_stats = step(batch_stats, jax.random.fold_in(key, i))
  return {**variables, "batch_stats": batch_stats}
