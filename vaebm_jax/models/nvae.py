"""NVAE (Vahdat & Kautz 2020) as VAEBM uses it (VAEBM_SPEC.md §5), Flax Linen, NHWC.

`NVAE.__call__` is the ELBO path (encoder + decoder); `NVAE.sample_from_eps` is the prior path,
the deterministic map T_θ of §1.3 from standard-normal noise to latents and decoder logits.
`decode_from_eps` wraps it in eval-mode BN, which is what stage 2 differentiates through.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax import traverse_util

from vaebm_jax.models import distributions
from vaebm_jax.models.layers import ARCH_CELLS, CONV_OUTPUT, Cell, Conv2D, conv_mode, resolve_remat

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


# Latent groups of one scale are identical, so each scale's groups are one `nn.scan`: one traced
# body whatever the number of groups (CIFAR-10 has 30), parameters stacked on a leading axis.
_SCANNED_COLLECTIONS = {"params": 0, "batch_stats": 0, "normalized_weights": 0}


REMAT_MODES = ("off", "keep_convs", "all")


def _cell_class(remat: str):
  """`Cell`, or `Cell` under `nn.remat`. "keep_convs": the backward pass recomputes each cell's BN,
  Swish and SE from its convolutions' outputs, which are kept (`layers.CONV_OUTPUT`); "all": it
  recomputes the whole cell from its input (least memory, the convolutions run twice)."""
  if remat not in REMAT_MODES:
    raise ValueError(f"remat must be one of {REMAT_MODES}, got {remat!r}")
  if remat == "off":
    return Cell
  policy = jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT) if remat == "keep_convs" else None
  return nn.remat(Cell, static_argnums=(2,), policy=policy)


def _scanned(module_cls, length: int, in_axes, methods=None):
  return nn.scan(module_cls, variable_axes=_SCANNED_COLLECTIONS, split_rngs={"params": True, "sample": True},
                 in_axes=in_axes, length=length, methods=methods)


_GROUP_STACK = re.compile(r"^(enc_groups|latent_groups)_\d+$")


def unstack_groups(variables: Any) -> Any:
  """Variables of a `scan_groups=True` NVAE → those of the same NVAE with `scan_groups=False`.

  `enc_groups_s` / `latent_groups_s`, stacked on axis 0, become `enc_groups_s_g` / `latent_groups_s_g`.
  """
  out = {}
  for collection, tree in variables.items():
    new = {}
    for name, sub in tree.items():
      if _GROUP_STACK.match(name):
        for g in range(jax.tree.leaves(sub)[0].shape[0]):
          new[f"{name}_{g}"] = jax.tree.map(lambda a, g=g: a[g], sub)
      else:
        new[name] = sub
    out[collection] = new
  return out


def _group_terms(q, p, log_q: jax.Array, log_p: jax.Array, monte_carlo_kl: bool) -> dict[str, jax.Array]:
  """Per-group KL (analytic, or log q − log p with flows) and the summed log-densities."""
  kl = log_q - log_p if monte_carlo_kl else q.kl(p)
  return {"kl_all": jnp.sum(kl, axis=(1, 2, 3)), "kl_diag": jnp.mean(jnp.sum(kl, axis=(1, 2)), axis=0),
          "log_q": jnp.sum(log_q, axis=(1, 2, 3)), "log_p": jnp.sum(log_p, axis=(1, 2, 3))}


class EncoderGroup(nn.Module):
  """The encoder cells of one latent group; the state after them is that group's combiner input."""
  features: int
  num_cells: int
  arch: Sequence[str]
  use_se: bool = True
  conv_impl: str = "auto"
  remat: str = "off"           # REMAT_MODES

  @nn.compact
  def __call__(self, s: jax.Array, train: bool):
    for c in range(self.num_cells):
      s = _cell_class(self.remat)(self.features, "normal_enc", self.arch, self.use_se, self.conv_impl,
                                  name=f"cell_{c}")(s, train)
    return s, s


class LatentGroup(nn.Module):
  """One latent group below the top (§5.3), in decoder order.

  Both paths run the decoder cells and the prior head (`dec_sampler`) on the decoder state, draw z,
  and feed it back through the decoder combiner:
  - `posterior(s, {"enc", "eps"?}, train)`: z from the residual posterior (encoder combiner,
    `enc_sampler`, flows) → (state, per-group KL and log-densities); the ELBO path.
  - `prior(s, {"eps", "temperature"}, train)`: z = μ_p + t·σ_p·ε → (state, {z, log p(z)}).
  Per-group inputs travel in the dict so that `nn.scan` runs either method over a scale's groups.
  """
  features_enc: int
  features_dec: int
  num_cells: int
  num_latent: int
  num_nf: int
  arch: Sequence[str]
  res_dist: bool = True
  use_se: bool = True
  conv_impl: str = "auto"
  remat: str = "off"           # REMAT_MODES

  def setup(self):
    impl, nz = self.conv_impl, self.num_latent
    # setattr keeps the submodule names of the reference's layout (dec_cell_0, nf_0, ...).
    for c in range(self.num_cells):
      setattr(self, f"dec_cell_{c}", _cell_class(self.remat)(self.features_dec, "normal_dec", self.arch,
                                                                self.use_se, impl))
    self.dec_sampler = Conv2D(2 * nz, 1, use_bias=True, conv_impl=impl)
    self.enc_combiner = EncCombinerCell(self.features_enc, impl)
    self.enc_sampler = Conv2D(2 * nz, 3, use_bias=True, conv_impl=impl)
    for n in range(self.num_nf):
      setattr(self, f"nf_{n}", PairedCellAR(nz, impl))
    self.dec_combiner = DecCombinerCell(self.features_dec, impl)

  def _prior_head(self, s: jax.Array, train: bool):
    for c in range(self.num_cells):
      s = getattr(self, f"dec_cell_{c}")(s, train)
    mu_p, log_sig_p = distributions.split_channels(self.dec_sampler(nn.elu(s)))
    return s, mu_p, log_sig_p

  def posterior(self, s: jax.Array, xs: dict, train: bool):
    s, mu_p, log_sig_p = self._prior_head(s, train)
    mu_q, log_sig_q = distributions.split_channels(self.enc_sampler(self.enc_combiner(xs["enc"], s)))
    if self.res_dist:
      q = distributions.Normal.from_params(mu_p + mu_q, log_sig_p + log_sig_q)
    else:
      q = distributions.Normal.from_params(mu_q, log_sig_q)
    eps = xs["eps"] if "eps" in xs else jax.random.normal(self.make_rng("sample"), mu_q.shape)
    z = q.sample_given_eps(eps)
    log_q = q.log_p(z)
    for n in range(self.num_nf):   # volume preserving: log det = 0
      z = getattr(self, f"nf_{n}")(z)
    p = distributions.Normal.from_params(mu_p, log_sig_p)
    return self.dec_combiner(s, z), _group_terms(q, p, log_q, p.log_p(z), self.num_nf > 0)

  def prior(self, s: jax.Array, xs: dict, train: bool):
    s, mu_p, log_sig_p = self._prior_head(s, train)
    p = distributions.Normal.from_params(mu_p, log_sig_p, xs["temperature"])
    z = p.sample_given_eps(xs["eps"])
    return self.dec_combiner(s, z), {"z": z, "log_p": jnp.sum(p.log_p(z), axis=(1, 2, 3))}


# Names of the decoder-path modules (the generative model p(x, z)) in the variable tree.
DECODER_MODULES = re.compile(
    r"^(prior_ftr0|dec_cell_\d+|dec_sampler|dec_combiner|dec_combiner_top|up_dec_\d+|post_process_\d+|"
    r"image_conditional|stem_decoder)$")


class NVAE(nn.Module):
  """The hierarchical VAE. Constructor arguments mirror the reference's command-line flags.

  Variable tree: `stem`, `pre_process_i`, `enc_groups_s` (encoder cells of the groups of encoder
  scale s, stacked), `down_enc_s`, `enc0`, `enc_sampler_top`, `nf_top_n`, `dec_combiner_top`,
  `latent_groups_s` (all other groups of decoder scale s, stacked: `LatentGroup`), `up_dec_s`,
  `post_process_i`, `image_conditional`, `prior_ftr0`. `torch_import.torch_module_map` relates it
  to the reference's flat module lists. With `scan_groups=False` the groups are separate modules
  (`enc_groups_s_g`, `latent_groups_s_g`; `unstack_groups` converts): straight-line code, slower to
  compile, faster on XLA:CPU where a loop body loses some fusions (what stage 2's Langevin uses).
  """
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
  # Operand dtype of every convolution: 'float32', or 'bfloat16' for accelerators (float32 accumulation
  # and outputs; BN, Swish, SE and all log-densities stay float32; models.layers.lowp_conv).
  conv_dtype: str = "float32"
  # Rematerialise cells in the backward pass: True, False, or None (on where it was measured faster,
  # i.e. on CPU; off elsewhere, the reference's setting). With `remat_keep_convs` the convolutions'
  # outputs are kept and only BN, Swish and SE are recomputed (stage 1 on CPU: faster than both other
  # choices, experiments/RESULTS.md); without, whole cells (least memory: stage 2 uses this).
  remat_cells: Optional[bool] = False
  remat_keep_convs: bool = True
  scan_groups: bool = True     # one nn.scan per scale over its latent groups (see the class docstring)

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

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.image_channels)

  def scanned_groups(self) -> list[tuple[int, int]]:
    """(first group index, count) of the scanned `latent_groups` of each decoder scale (top first)."""
    spans, start = [], 1
    for s in range(self.num_latent_scales):
      n = self.groups[self.num_latent_scales - 1 - s] - (1 if s == 0 else 0)
      spans.append((start, n))
      start += n
    return spans

  # -------------------------------------------------------------------------------- modules
  def setup(self):
    if self.image_size % 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1):
      raise ValueError(f"image_size {self.image_size} must be divisible by 2^(num_preprocess_blocks + "
                       f"num_latent_scales - 1)")
    arch = ARCH_CELLS[self.arch_instance]
    impl = conv_mode(self.conv_impl, self.conv_dtype)
    cell_cls = _cell_class(self.remat_mode())

    def cell(features, cell_type):
      return cell_cls(features, cell_type, arch[cell_type], self.use_se, impl)

    c_enc, c_dec, nz = self.num_channels_enc, self.num_channels_dec, self.num_latent_per_group
    scales = self.num_latent_scales
    scale = CHANNEL_MULT ** (self.num_preprocess_blocks + scales - 1)
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

    def groups(module_cls, scale, n, in_axes, methods, *args):
      if self.scan_groups:
        return {str(scale): _scanned(module_cls, n, in_axes, methods)(*args)} if n > 0 else {}
      return {f"{scale}_{g}": module_cls(*args) for g in range(n)}

    enc_groups, down_enc = {}, []
    if not self.vanilla_vae:
      for s in range(scales):
        enc_groups.update(groups(EncoderGroup, s, self.groups[s], (nn.broadcast,), None, int(c_enc * mult),
                                 self.num_cell_per_cond_enc, arch["normal_enc"], self.use_se, impl, self.remat_mode()))
        if s < scales - 1:
          down_enc.append(cell(int(CHANNEL_MULT * c_enc * mult), "down_enc"))
          mult *= CHANNEL_MULT
    self.enc_groups, self.down_enc = enc_groups, down_enc

    self.enc0 = Conv2D(int(c_enc * mult), 1, use_bias=True, conv_impl=impl)
    self.enc_sampler_top = Conv2D(2 * nz, 3, use_bias=True, conv_impl=impl)
    self.nf_top = [PairedCellAR(nz, impl) for _ in range(self.num_nf)]

    latent_groups, up_dec = {}, []
    if self.vanilla_vae:
      self.stem_decoder = Conv2D(int(mult * c_enc), 1, use_bias=True, conv_impl=impl)
    else:
      self.dec_combiner_top = DecCombinerCell(int(c_dec * mult), impl)
      for s, (_, n) in enumerate(self.scanned_groups()):
        latent_groups.update(groups(LatentGroup, s, n, (0, nn.broadcast), ["posterior", "prior"],
                                    int(c_enc * mult), int(c_dec * mult), self.num_cell_per_cond_dec, nz,
                                    self.num_nf, arch["normal_dec"], self.res_dist, self.use_se, impl,
                                    self.remat_mode()))
        if s < scales - 1:
          up_dec.append(cell(int(c_dec * mult / CHANNEL_MULT), "up_dec"))
          mult /= CHANNEL_MULT
    self.latent_groups, self.up_dec = latent_groups, up_dec

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
  def _run_encoder_groups(self, scale: int, s: jax.Array, train: bool):
    """The encoder groups of one scale → (state, the state after each group's cells)."""
    n = self.groups[scale]
    if self.scan_groups:
      s, states = self.enc_groups[str(scale)](s, train)
      return s, [states[g] for g in range(n)]
    states = []
    for g in range(n):
      s, _ = self.enc_groups[f"{scale}_{g}"](s, train)
      states.append(s)
    return s, states

  def _run_latent_groups(self, scale: int, method: str, s: jax.Array, xs: list, train: bool):
    """`LatentGroup.<method>` over the groups of decoder scale `scale`, per-group inputs xs → (state, outputs)."""
    if self.scan_groups:
      stacked = jax.tree.map(lambda *a: jnp.stack(a), *xs)
      s, ys = getattr(self.latent_groups[str(scale)], method)(s, stacked, train)
      return s, [jax.tree.map(lambda a, g=g: a[g], ys) for g in range(len(xs))]
    outs = []
    for g, x in enumerate(xs):
      s, out = getattr(self.latent_groups[f"{scale}_{g}"], method)(s, x, train)
      outs.append(out)
    return s, outs

  def _decode(self, z_top: jax.Array, run_scale, train: bool) -> jax.Array:
    """Decoder tower; `run_scale(scale, span, s)` runs the latent groups (below the top) of a scale."""
    if self.vanilla_vae:
      s = self.stem_decoder(z_top)
    else:
      s = jnp.broadcast_to(self.prior_ftr0[None], (z_top.shape[0],) + self.prior_ftr0.shape)
      s = self.dec_combiner_top(s, z_top)
      for scale, span in enumerate(self.scanned_groups()):
        if span[1] > 0:
          s = run_scale(scale, span, s)
        if scale < self.num_latent_scales - 1:
          s = self.up_dec[scale](s, train)
    for cell in self.post_process:
      s = cell(s, train)
    return self.image_conditional(nn.elu(s))

  # -------------------------------------------------------------------------------- ELBO path
  def __call__(self, x: jax.Array, train: bool = True, eps: Optional[Sequence[jax.Array]] = None) -> ElboOutput:
    """Encoder + decoder on images x in [0, 1] (NHWC).

    Args:
      x: images in [0, 1], (B, H, W, C).
      train: BN in train mode (batch statistics, running stats updated) or eval mode.
      eps: optional posterior noise per group (top first); drawn from the 'sample' rng if None.
    """
    scales = self.num_latent_scales
    s = self.stem(2.0 * x - 1.0)
    for cell in self.pre_process:
      s = cell(s, train)
    enc_states = []                     # per encoder scale: the state after each group's cells
    for scale in range(scales):
      if not self.vanilla_vae:
        s, states = self._run_encoder_groups(scale, s, train)
        enc_states.append(states)
      if scale < scales - 1:
        s = self.down_enc[scale](s, train)

    ftr = nn.elu(self.enc0(nn.elu(s)))
    q = distributions.Normal.from_params(*distributions.split_channels(self.enc_sampler_top(ftr)))
    z = q.sample_given_eps(eps[0] if eps is not None else jax.random.normal(self.make_rng("sample"), q.mu.shape))
    log_q = q.log_p(z)
    for flow in self.nf_top:
      z = flow(z)
    p = distributions.standard_normal_prior(z.shape, z.dtype)
    terms = [_group_terms(q, p, log_q, p.log_p(z), self.num_nf > 0)]

    def run_scale(scale, span, s):
      start = span[0]
      # Decoder group g of this scale meets the encoder state of group G−1−g of the mirrored
      # encoder scale; at the top scale the last encoder group fed the top group instead.
      enc = enc_states[scales - 1 - scale]
      enc = enc[:-1][::-1] if scale == 0 else enc[::-1]
      xs = [{"enc": e} if eps is None else {"enc": e, "eps": eps[start + g]} for g, e in enumerate(enc)]
      s, outs = self._run_latent_groups(scale, "posterior", s, xs, train)
      terms.extend(outs)
      return s

    logits = self._decode(z, run_scale, train)
    return ElboOutput(logits, sum(t["log_q"] for t in terms), sum(t["log_p"] for t in terms),
                      [t["kl_all"] for t in terms], [t["kl_diag"] for t in terms])

  # -------------------------------------------------------------------------------- prior path
  def sample_from_eps(self, eps_z: Sequence[jax.Array], temperature: float = 1.0, train: bool = False):
    """T_θ^z: standard-normal noise per group (top first) → (logits, z per group, Σ log p(z)).

    z_1 = 1.01·t·ε_1; z_l = μ_l + t·σ_l·ε_l with (μ_l, σ_l) from the prior head on the decoder
    state (§1.3). log p(z) uses the same tempered distributions, so its residual equals ε.
    """
    p = distributions.standard_normal_prior(eps_z[0].shape, eps_z[0].dtype, temperature)
    z = p.sample_given_eps(eps_z[0])
    z_list, log_p = [z], jnp.sum(p.log_p(z), axis=(1, 2, 3))

    def run_scale(scale, span, s):
      nonlocal log_p
      start, n = span
      xs = [{"eps": e, "temperature": temperature} for e in eps_z[start:start + n]]
      s, outs = self._run_latent_groups(scale, "prior", s, xs, train)
      z_list.extend(out["z"] for out in outs)
      log_p = log_p + sum(out["log_p"] for out in outs)
      return s

    logits = self._decode(z, run_scale, train)
    return logits, z_list, log_p

  @nn.nowrap
  def decoder_distribution(self, logits: jax.Array):
    return distributions.decoder_output(self.decoder, logits, self.num_mixture_dec, self.num_x_bits)

  @nn.nowrap
  def remat_mode(self) -> str:
    """What the cells rematerialise (`REMAT_MODES`), `remat_cells` = None resolved for this backend."""
    if not resolve_remat(self.remat_cells):
      return "off"
    return "keep_convs" if self.remat_keep_convs else "all"

  # ------------------------------------------------- interface.LikelihoodVAE (what stage 2 and metrics use)
  @nn.nowrap
  def decode_from_eps(self, variables: Any, eps_z: Sequence[jax.Array], eps_x: jax.Array,
                      temperature: float = 1.0) -> dict[str, jax.Array]:
    """T_θ(ε_z, ε_x) with eval-mode BN; see the module-level `decode_from_eps`."""
    return decode_from_eps(self, variables, eps_z, eps_x, temperature)

  @nn.nowrap
  def decoder_variables(self, variables: Any) -> dict:
    """The part of `variables` that `decode_from_eps` reads: the decoder path (`DECODER_MODULES`,
    inside the latent groups too), without the encoder tower, encoder combiners and samplers, and
    flows. For stage 2, which only decodes: about half the memory of a CIFAR-10 NVAE's weights."""
    keep = lambda path: any(DECODER_MODULES.match(p) for p in path)
    return {col: traverse_util.unflatten_dict({k: v for k, v in traverse_util.flatten_dict(tree).items() if keep(k)})
            for col, tree in variables.items()}

  @nn.nowrap
  def log_importance_weight(self, variables: Any, x: jax.Array, key: jax.Array) -> jax.Array:
    """log p(x|z) + log p(z) − log q(z|x), z ~ q(z|x), eval-mode BN, NVAE's unfloored p(x|z).

    x in [0, 1] (quantised to `num_x_bits` first, as in training). The Gaussian decoder's density is
    of 2x − 1 on [−1, 1]; add D·log 2 for the density of x on [0, 1]. The flows are volume
    preserving, so log q is that of the pre-flow sample (§5.4).
    """
    x = quantize(x, self.num_x_bits)
    out = self.apply(variables, x, False, rngs={"sample": key})
    log_px = self.decoder_distribution(out.logits).log_prob(x)
    return jnp.sum(log_px.reshape(x.shape[0], -1), axis=1) + out.log_p - out.log_q


def quantize(x: jax.Array, num_bits: int) -> jax.Array:
  """x ← floor(255x / 2^(8−b)) / (2^b − 1) for b ≠ 8 (§5.1)."""
  if num_bits == 8:
    return x
  return jnp.floor(x * 255.0 / 2 ** (8 - num_bits)) / (2 ** num_bits - 1)


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
      "log_p_x_given_z": jnp.sum(dist.floored_log_prob(x), axis=(1, 2, 3)),
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
