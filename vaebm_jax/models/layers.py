"""Primitive layers of NVAE (VAEBM_SPEC.md §5.2), in NHWC layout.

Convolutions are the one place where the backend matters: XLA:CPU runs depthwise convolutions
(`feature_group_count` = channels) far slower than PyTorch (jax-ml/jax#23713) while a 1×1
convolution written as a matrix product beats it; depthwise convolutions on CPU have their own
module (`depthwise.py`: a native kernel, and XLA code where it cannot be built). `conv2d` owns that
choice; every module goes through it, and tests check that every implementation gives the same numbers.

The convolutions' operands can also be bfloat16 (`conv_mode(impl, 'bfloat16')`, the NVAE's and the energy
network's `conv_dtype`): for accelerators, where bf16 matrix units are several times faster than float32.
Both operands are rounded to bf16, the products accumulate in float32 and the output is float32, so every
other layer (BatchNorm, Swish, SE, the log-densities built on the outputs) stays float32; the backward
pass's convolutions take bf16 operands too (`lowp_conv`).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from vaebm_jax.models import depthwise

CONV_IMPLS = ("auto", "xla", "fast_cpu")
CONV_DTYPES = ("float32", "bfloat16")
BN_EPS = 1e-5
# PyTorch momentum 0.05 == running = 0.95 * running + 0.05 * batch.
BN_TORCH_MOMENTUM = 0.05


# Every conv2d output carries this name: `nn.remat` policies keep them (models.nvae "keep_convs").
CONV_OUTPUT = "conv_output"


def resolve_remat(remat: Optional[bool]) -> bool:
  """None means: rematerialise where that was measured faster, i.e. on CPU (experiments/RESULTS.md,
  the NVAE step); elsewhere off, the reference's setting."""
  return jax.default_backend() == "cpu" if remat is None else bool(remat)


def conv_mode(impl: str, dtype: str = "float32") -> str:
  """The `conv_impl` string that modules pass down to `conv2d`: the implementation, and ':bfloat16' when
  the operands are bf16 (the top-level modules take the two as separate fields)."""
  _check_mode(impl, dtype)
  return impl if dtype == "float32" else f"{impl}:{dtype}"


def split_conv_mode(mode: str) -> tuple[str, str]:
  """(implementation, operand dtype) of a `conv_mode` string."""
  impl, _, dtype = mode.partition(":")
  dtype = dtype or "float32"
  _check_mode(impl, dtype)
  return impl, dtype


def _check_mode(impl: str, dtype: str) -> None:
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  if dtype not in CONV_DTYPES:
    raise ValueError(f"conv_dtype must be one of {CONV_DTYPES}, got {dtype!r}")


def resolve_conv_impl(mode: str) -> str:
  """Maps 'auto' to the implementation that is fastest on the default backend. Convolutions with bf16
  operands always take 'xla' (the CPU kernels of 'fast_cpu' are float32 only)."""
  impl, dtype = split_conv_mode(mode)
  if dtype != "float32":
    return "xla"
  if impl == "auto":
    return "fast_cpu" if jax.default_backend() == "cpu" else "xla"
  return impl


# ----------------------------------------------------------------------------------------------
# Dense stride-1 'same' convolution with a hand-written VJP. Inside a `lax.scan` body (the scanned
# latent groups) XLA:CPU emits the autodiff kernel gradient of a 3×3 conv as a naive loop nest
# (f01b_i01o->01bf, ~10× slower than at top level); here it is one im2col matrix product and the
# input gradient a plain convolution with the flipped, transposed kernel.
# ----------------------------------------------------------------------------------------------


def _conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
  p = (w.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def dense_conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 'same' dense conv. x: (B, H, W, C_in); w: (k, k, C_in, C_out) with k odd."""
  return _conv_same(x, w)


def _dense_fwd(x, w):
  return _conv_same(x, w), (x, w)


def _dense_bwd(res, g):
  x, w = res
  k = w.shape[0]
  p = (k - 1) // 2
  _, height, width, c_in = x.shape
  dx = _conv_same(g, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)))
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  patches = jnp.concatenate([xp[:, i:i + height, j:j + width, :] for i in range(k) for j in range(k)], axis=-1)
  dw = jnp.dot(patches.reshape(-1, k * k * c_in).T, g.reshape(-1, g.shape[-1]))
  return dx, dw.reshape(w.shape).astype(w.dtype)


dense_conv_same.defvjp(_dense_fwd, _dense_bwd)


# ----------------------------------------------------------------------------------------------
# 1×1 convolution as a matrix product with a hand-written VJP. For the einsum's autodiff kernel
# gradient XLA:CPU materialises gᵀ (C_out × B·H·W, the large side of an inverted-residual block's
# expansion) through a strided transposing copy into which it also fuses the BatchNorm/Swish
# backward: in the Fashion-MNIST NVAE those copies were ~15 % of a step. A dot_general contracting
# both operands over their leading (B·H·W) axis needs no copy at all.
# ----------------------------------------------------------------------------------------------


@jax.custom_vjp
def pointwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """1×1 conv. x: (B, H, W, C_in); w: (C_in, C_out)."""
  return jnp.einsum("bhwi,io->bhwo", x, w)


def _pointwise_fwd(x, w):
  return pointwise_conv(x, w), (x, w)


def _pointwise_bwd(res, g):
  x, w = res
  dx = jnp.einsum("bhwo,io->bhwi", g, w)
  g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
  dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
  return dx, dw.astype(w.dtype)


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)


# ----------------------------------------------------------------------------------------------
# Convolution with low-precision operands. Autodiff of a bf16 convolution with a float32 output
# (`preferred_element_type`) runs its transposes on float32 operands, i.e. the backward pass (two
# thirds of a Langevin step) at float32 speed; here the backward convolutions take the bf16 residuals
# and the cotangent rounded to bf16, as mixed-precision training does, and return float32.
# ----------------------------------------------------------------------------------------------


def _lax_conv(x, w, stride, padding, groups, out_dtype=None):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def lowp_conv(x: jax.Array, w: jax.Array, stride: int, padding: int, groups: int, dtype: str) -> jax.Array:
  """Float32 x and HWIO w rounded to `dtype`, convolved with float32 accumulation; float32 output."""
  return _lax_conv(x.astype(dtype), w.astype(dtype), stride, padding, groups, jnp.float32)


def _lowp_fwd(x, w, stride, padding, groups, dtype):
  xl, wl = x.astype(dtype), w.astype(dtype)
  return _lax_conv(xl, wl, stride, padding, groups, jnp.float32), (xl, wl)


def _lowp_bwd(stride, padding, groups, dtype, res, g):
  xl, wl = res
  _, vjp = jax.vjp(lambda a, b: _lax_conv(a, b, stride, padding, groups), xl, wl)
  dx, dw = vjp(g.astype(dtype))
  return dx.astype(jnp.float32), dw.astype(jnp.float32)


lowp_conv.defvjp(_lowp_fwd, _lowp_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
           groups: int = 1, impl: str = "auto") -> jax.Array:
  """2-D convolution in NHWC with an HWIO kernel, PyTorch padding semantics.

  Args:
    x: (B, H, W, C_in).
    kernel: (k, k, C_in // groups, C_out).
    stride: 1 or 2.
    padding: symmetric zero padding on both spatial axes.
    groups: 1 (dense) or C_in (depthwise).
    impl: 'xla' (lax.conv_general_dilated), 'fast_cpu' (1×1 as matmul, depthwise through
      `depthwise.depthwise_conv`, dense stride-1 convs with an im2col kernel gradient) or 'auto'
      (fast_cpu on CPU, xla elsewhere); with ':bfloat16' appended (`conv_mode`), `lowp_conv`.
  Returns:
    (B, H', W', C_out).
  """
  return checkpoint_name(_conv2d(x, kernel, stride, padding, groups, impl), CONV_OUTPUT)


def _conv2d(x, kernel, stride, padding, groups, mode):
  impl, dtype = resolve_conv_impl(mode), split_conv_mode(mode)[1]
  if dtype != "float32":
    return lowp_conv(x, kernel, stride, padding, groups, dtype)
  k = kernel.shape[0]
  if impl == "fast_cpu":
    if k == 1 and groups == 1 and padding == 0:
      return pointwise_conv(x[:, ::stride, ::stride, :], kernel[0, 0])
    if groups > 1 and groups == x.shape[-1] == kernel.shape[-1] and stride == 1 and padding == (k - 1) // 2:
      return depthwise.depthwise_conv(x, kernel[:, :, 0, :])
    if groups == 1 and k > 1 and stride == 1 and padding == (k - 1) // 2:
      return dense_conv_same(x, kernel)
  return _lax_conv(x, kernel, stride, padding, groups)


# ----------------------------------------------------------------------------------------------
# Swish with a derivative that keeps one tensor. For autodiff of x·sigmoid(x) XLA keeps x (or the conv
# output it is an affine map of) and sigmoid(x) for the backward pass; in the frozen NVAE of a Langevin
# chain, whose convolutions are linear maps, these are almost all it keeps: 4 tensors of the 6×
# expanded width per decoder cell. The JVP below is t · swish'(x), a function of x alone that XLA
# recomputes from x in the backward pass: 2 tensors per cell. Values are those of `nn.swish`.
# ----------------------------------------------------------------------------------------------


@jax.custom_jvp
def swish(x: jax.Array) -> jax.Array:
  """x · sigmoid(x), with d/dx = s · (1 + x · (1 − s)), s = sigmoid(x)."""
  return x * jax.nn.sigmoid(x)


@swish.defjvp
def _swish_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  # sigmoid through tanh, not through the primal's 1 / (1 + exp(-x)). With the same ops XLA merges the
  # two (CSE) and keeps sigmoid(x) alive for the backward pass beside x; an exp used twice (an exact
  # form through exp(-|x|)) is kept as well. tanh lets XLA recompute the whole coefficient from x in
  # the backward pass. Float32 error ≤ 1e-5 absolute, like autodiff's; XLA's tanh saturates below
  # x ≈ −16, where the derivative (under 2e-6) becomes 0.
  s = 0.5 + 0.5 * jnp.tanh(0.5 * x)
  return swish(x), t * (s * (1 + x * (1 - s)))


# ----------------------------------------------------------------------------------------------
# Autoregressive masks (§5.4), built in PyTorch's (O, I, kH, kW) layout then moved to HWIO.
# ----------------------------------------------------------------------------------------------


def _channel_mask(c_in: int, g_in: int, c_out: int, zero_diag: bool) -> np.ndarray:
  if g_in == 1:
    mask = np.ones([c_out, c_in], dtype=np.float32)
    if c_out >= c_in:
      ratio = c_out // c_in
      for i in range(c_in):
        mask[i * ratio:(i + 1) * ratio, i + 1:] = 0
        if zero_diag:
          mask[i * ratio:(i + 1) * ratio, i:i + 1] = 0
    else:
      ratio = c_in // c_out
      for i in range(c_out):
        mask[i:i + 1, (i + 1) * ratio:] = 0
        if zero_diag:
          mask[i:i + 1, i * ratio:(i + 1) * ratio] = 0
    return mask
  if g_in == c_in:
    return np.zeros([c_out, 1], np.float32) if zero_diag else np.ones([c_out, 1], np.float32)
  raise ValueError("AR masks support groups == 1 or groups == C_in")


@functools.lru_cache(maxsize=None)
def autoregressive_mask(kernel_size: int, c_in: int, groups: int, c_out: int, zero_diag: bool,
                        mirror: bool) -> np.ndarray:
  """Raster-order causal mask in HWIO: rows above, the left of the centre row, channel order."""
  m = (kernel_size - 1) // 2
  mask = np.ones([c_out, c_in // groups, kernel_size, kernel_size], dtype=np.float32)
  mask[:, :, m:, :] = 0
  mask[:, :, m, :m] = 1
  mask[:, :, m, m] = _channel_mask(c_in, groups, c_out, zero_diag)
  if mirror:
    mask = mask[:, :, ::-1, ::-1]
  return np.ascontiguousarray(mask.transpose(2, 3, 1, 0))


def torch_uniform_init(fan_in: int):
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def normalize_weight(kernel: jax.Array, log_weight_norm: jax.Array) -> jax.Array:
  """w = exp(log g) · v / (‖v‖ + 1e-5), norm per output channel (last axis)."""
  norm = jnp.sqrt(jnp.sum(kernel * kernel, axis=(0, 1, 2)))
  return jnp.exp(log_weight_norm) * kernel / (norm + 1e-5)


class Conv2D(nn.Module):
  """NVAE's weight-normalised conv (§5.2); also the masked `ARConv2d` of the flows (§5.4).

  The normalised weight is sown into the 'normalized_weights' collection so that the spectral
  regulariser sees exactly the matrices the forward pass used.
  """
  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = False
  weight_norm: bool = True
  groups: int = 1
  ar_mask: Optional[tuple] = None  # (zero_diag, mirror) for masked autoregressive convs
  log_norm_offset: float = 0.0     # log(weight_init_coeff) of the flows' output conv
  data_init: bool = False          # data-dependent init (VAEBM_SPEC.md §3.2): outputs mean 0, std 0.2
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, kernel_only: bool = False) -> jax.Array:
    """The convolution of x; with `kernel_only`, its (normalised, masked) HWIO kernel instead, for kernels
    that apply it themselves (x then gives only the input channels)."""
    c_in = x.shape[-1]
    k = self.kernel_size
    fan_in = (c_in // self.groups) * k * k
    conv = functools.partial(conv2d, stride=self.stride, padding=(k - 1) // 2, groups=self.groups,
                             impl=self.conv_impl)
    kernel = self.param("kernel", torch_uniform_init(fan_in), (k, k, c_in // self.groups, self.features))
    if self.ar_mask is not None:
      zero_diag, mirror = self.ar_mask
      kernel = kernel * jnp.asarray(autoregressive_mask(k, c_in, self.groups, self.features, zero_diag, mirror))
    init_stats = None
    if self.data_init and self.is_initializing():
      # Linen's init runs the real forward pass on real data: the statistics of this conv's output
      # with the unit-norm direction set the gain and bias (torch.std is the unbiased one).
      direction = kernel / (jnp.sqrt(jnp.sum(kernel * kernel, axis=(0, 1, 2))) + 1e-5)
      out = conv(x, direction)
      mean = jnp.mean(out, axis=(0, 1, 2))
      n = out.size // out.shape[-1]
      std5 = 5.0 * jnp.sqrt(jnp.sum(jnp.square(out - mean), axis=(0, 1, 2)) / max(n - 1, 1))
      init_stats = (mean, std5)
    if self.weight_norm:
      if init_stats is not None:
        lwn_init = lambda _: -jnp.log(init_stats[1] + 1e-5)
      else:
        lwn_init = lambda _: jnp.log(jnp.sqrt(jnp.sum(kernel * kernel, axis=(0, 1, 2))) + 1e-2) + self.log_norm_offset
      kernel = normalize_weight(kernel, self.param("log_weight_norm", lwn_init))
    self.sow("normalized_weights", "kernel", kernel)
    if kernel_only:
      if self.use_bias:
        raise ValueError("Conv2D(kernel_only=True) is for convolutions without bias")
      return kernel
    y = conv(x, kernel)
    if self.use_bias:
      if init_stats is not None:
        bias_init = lambda _: -init_stats[0] / (init_stats[1] + 1e-5)
      else:
        bias_init = lambda key: torch_uniform_init(fan_in)(key, (self.features,))
      y = y + self.param("bias", bias_init)
    return y


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics: biased variance to normalise, unbiased to track, momentum 0.05.

  Under `jax.jit` with a batch sharded over devices, the batch statistics are those of the global
  batch, which is what SyncBatchNorm computes in the reference.
  """
  momentum: float = BN_TORCH_MOMENTUM
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool, affine_only: bool = False):
    """Normalised x; with `affine_only` (eval mode only), the per-channel (a, b) of the map a·x + b that
    the running statistics make of it, for kernels that apply it themselves."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if affine_only:
      if not use_running_average:
        raise ValueError("BatchNorm(affine_only=True) needs use_running_average=True")
      a = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return a, bias - ra_mean.value * a
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      if not self.is_initializing():
        n = np.prod([x.shape[a] for a in axes])
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * jax.lax.stop_gradient(mean)
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * jax.lax.stop_gradient(unbiased)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class SqueezeExcitation(nn.Module):
  """SE: global average pool → Linear(C→max(C/16, 4)) → ReLU → Linear → sigmoid → scale."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    hidden = max(c // 16, 4)
    s = jnp.mean(x, axis=(1, 2))
    s = nn.Dense(hidden, kernel_init=torch_uniform_init(c), bias_init=torch_uniform_init(c), name="se_0")(s)
    s = nn.relu(s)
    s = nn.Dense(c, kernel_init=torch_uniform_init(hidden), bias_init=torch_uniform_init(hidden), name="se_2")(s)
    return x * jax.nn.sigmoid(s)[:, None, None, :]


def upsample_nearest(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


@functools.lru_cache(maxsize=None)
def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  m = np.zeros((n_out, n_in), np.float32)
  if n_in == 1:
    m[:, 0] = 1.0
    return m
  src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.clip(np.floor(src).astype(int), 0, n_in - 2)
  frac = (src - lo).astype(np.float32)
  m[np.arange(n_out), lo] += 1 - frac
  m[np.arange(n_out), lo + 1] += frac
  return m


def upsample_bilinear_align_corners(x: jax.Array) -> jax.Array:
  """×2 bilinear upsampling with align_corners=True (PyTorch F.interpolate)."""
  h, w = x.shape[1], x.shape[2]
  mh = jnp.asarray(_align_corners_matrix(h, 2 * h))
  mw = jnp.asarray(_align_corners_matrix(w, 2 * w))
  return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw)


class FactorizedReduce(nn.Module):
  """Stride-2 skip: Swish, then four 1×1 stride-2 convs on shifted inputs, concatenated."""
  features: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    q = self.features // 4
    out = swish(x)
    conv = functools.partial(Conv2D, kernel_size=1, stride=2, use_bias=True, conv_impl=self.conv_impl)
    return jnp.concatenate([
        conv(q, name="conv_1")(out),
        conv(q, name="conv_2")(out[:, 1:, 1:, :]),
        conv(q, name="conv_3")(out[:, :, 1:, :]),
        conv(self.features - 3 * q, name="conv_4")(out[:, 1:, :, :]),
    ], axis=-1)


class BNSwishConv(nn.Module):
  """`res_bnswish`: BN-Swish → [nearest ×2] → Conv3×3 (bias, weight norm)."""
  features: int
  stride: int = 1  # 1, 2, or -1 for ×2 upsampling
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = swish(BatchNorm(name="bn_act")(x, use_running_average=not train))
    if self.stride == -1:
      out = upsample_nearest(out)
    return Conv2D(self.features, 3, stride=abs(self.stride), use_bias=True, conv_impl=self.conv_impl,
                  name="conv_0")(out)


class InvertedResidual(nn.Module):
  """`mconv_e{ex}k{k}g0`: [nearest ×2] → BN → 1×1 expand, BN-Swish → depthwise k×k, BN-Swish →
  1×1 project → BN. Convs have no weight norm and no bias. In eval mode on CPU the middle (BN-Swish →
  depthwise → BN-Swish) is one native kernel, `depthwise.native_dwcell`, where it can run; same
  variables either way."""
  features: int
  stride: int = 1
  expansion: int = 6
  kernel_size: int = 5
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    hidden = int(round(x.shape[-1] * self.expansion))
    conv = functools.partial(Conv2D, weight_norm=False, use_bias=False, conv_impl=self.conv_impl)
    if self.stride == -1:
      x = upsample_nearest(x)
    x = BatchNorm(name="bn_in")(x, use_running_average=ura)
    x = conv(hidden, 1, name="conv_expand")(x)
    depthwise_conv = conv(hidden, self.kernel_size, stride=abs(self.stride), groups=hidden, name="conv_depthwise")
    if ura and self._fused_middle(x):
      # Eval mode on CPU: BN-Swish → depthwise → BN-Swish as one native kernel (depthwise.native_dwcell).
      a1, b1 = BatchNorm(name="bn_expand")(x, use_running_average=True, affine_only=True)
      a2, b2 = BatchNorm(name="bn_depthwise")(x, use_running_average=True, affine_only=True)
      x = depthwise.native_dwcell(x, depthwise_conv(x, kernel_only=True)[:, :, 0, :], a1, b1, a2, b2)
    else:
      x = swish(BatchNorm(name="bn_expand")(x, use_running_average=ura))
      x = depthwise_conv(x)
      x = swish(BatchNorm(name="bn_depthwise")(x, use_running_average=ura))
    x = conv(self.features, 1, name="conv_project")(x)
    return BatchNorm(name="bn_out")(x, use_running_average=ura)

  def _fused_middle(self, x: jax.Array) -> bool:
    return (abs(self.stride) == 1 and resolve_conv_impl(self.conv_impl) == "fast_cpu"
            and depthwise.dwcell_supported(x, self.kernel_size))


OPS = {
    "res_bnswish": lambda c, s, impl, name: BNSwishConv(c, s, impl, name=name),
    "mconv_e6k5g0": lambda c, s, impl, name: InvertedResidual(c, s, 6, 5, impl, name=name),
    "mconv_e3k5g0": lambda c, s, impl, name: InvertedResidual(c, s, 3, 5, impl, name=name),
}

ARCH_CELLS = {
    "res_mbconv": {
        "normal_enc": ("res_bnswish", "res_bnswish"),
        "down_enc": ("res_bnswish", "res_bnswish"),
        "normal_dec": ("mconv_e6k5g0",),
        "up_dec": ("mconv_e6k5g0",),
        "normal_pre": ("res_bnswish", "res_bnswish"),
        "down_pre": ("res_bnswish", "res_bnswish"),
        "normal_post": ("mconv_e3k5g0",),
        "up_post": ("mconv_e3k5g0",),
    },
    "res_bnswish": {t: ("res_bnswish", "res_bnswish") for t in (
        "normal_enc", "down_enc", "normal_dec", "up_dec", "normal_pre", "down_pre", "normal_post", "up_post")},
}


def stride_for_cell_type(cell_type: str) -> int:
  if cell_type.startswith("normal") or cell_type.startswith("combiner"):
    return 1
  if cell_type.startswith("down"):
    return 2
  if cell_type.startswith("up"):
    return -1
  raise ValueError(f"unknown cell type {cell_type!r}")


class Cell(nn.Module):
  """out = skip(s) + 0.1 · SE(ops(s)) (§5.2)."""
  features: int
  cell_type: str
  arch: Sequence[str]
  use_se: bool = True
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, s: jax.Array, train: bool) -> jax.Array:
    stride = stride_for_cell_type(self.cell_type)
    if stride == 1:
      skip = s
    elif stride == 2:
      skip = FactorizedReduce(self.features, self.conv_impl, name="skip")(s)
    else:
      skip = Conv2D(self.features, 1, conv_impl=self.conv_impl, name="skip")(upsample_bilinear_align_corners(s))
    out = s
    for i, primitive in enumerate(self.arch):
      out = OPS[primitive](self.features, stride if i == 0 else 1, self.conv_impl, f"ops_{i}")(out, train)
    if self.use_se:
      out = SqueezeExcitation(name="se")(out)
    return skip + 0.1 * out
