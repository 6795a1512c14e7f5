"""Energy networks of VAEBM (VAEBM_SPEC.md §4): weight-normalised conv ResNets, LipSwish,
global spatial *sum* pooling and a linear head. E(x) takes images in [0, 1] (NHWC)."""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vaebm_jax.models.layers import Conv2D, conv_mode, swish, torch_uniform_init

# Block lists in units of n_channel: (channel multiple, downsample).
ARCHITECTURES = {
    "cifar10": ((1, True), (1, False), (2, True), (2, False), (2, True), (2, False)),
    "celeba64": ((1, True), (1, False), (2, True), (2, False), (2, True), (4, False), (4, True), (4, False)),
    "lsun_church64": ((1, True), (1, False), (2, True), (2, False), (2, False), (2, True), (4, False), (4, False),
                      (4, True), (4, False)),
    "celebahq256": ((1, True), (1, False), (2, True), (2, False), (2, True), (2, False), (4, True), (4, False),
                    (4, True), (4, False), (8, True), (8, False)),
    "mnist": ((1, True), (1, False), (2, True), (2, False)),
}


def lip_swish(x: jax.Array) -> jax.Array:
  """Swish scaled to be ≈1-Lipschitz: x·sigmoid(x)/1.1."""
  return swish(x) / 1.1


class ResBlock(nn.Module):
  """h = Conv3×3 → LipSwish → Conv3×3; o = h + skip; AvgPool2×2 if down; LipSwish(o)."""
  features: int
  downsample: bool = False
  data_init: bool = True
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv2D, data_init=self.data_init, conv_impl=self.conv_impl)
    out = conv(self.features, 3, use_bias=True, name="conv1")(x)
    out = conv(self.features, 3, use_bias=True, name="conv2")(lip_swish(out))
    skip = x
    if x.shape[-1] != self.features or self.downsample:
      skip = conv(self.features, 1, use_bias=False, name="skip_0")(x)
    out = out + skip
    if self.downsample:
      out = nn.avg_pool(out, (2, 2), strides=(2, 2))
    return lip_swish(out)


class EnergyNet(nn.Module):
  """E(x) ∈ ℝ per image. `architecture` picks the block list; `n_channel` is C."""
  architecture: str = "cifar10"
  n_channel: int = 128
  data_init: bool = True
  conv_impl: str = "auto"
  blocks: Sequence = None   # optional explicit ((multiple, downsample), ...) overriding `architecture`
  conv_dtype: str = "float32"  # operand dtype of the convolutions (models.layers.conv_mode); the head is float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    blocks = self.blocks if self.blocks is not None else ARCHITECTURES[self.architecture]
    impl = conv_mode(self.conv_impl, self.conv_dtype)
    out = lip_swish(Conv2D(self.n_channel, 3, use_bias=True, data_init=self.data_init, conv_impl=impl,
                           name="conv1")(x))
    for i, (multiple, down) in enumerate(blocks):
      out = ResBlock(multiple * self.n_channel, down, self.data_init, impl, name=f"blocks_{i}")(out)
    out = jnp.sum(out, axis=(1, 2))                     # global spatial sum, not mean
    c = out.shape[-1]
    return nn.Dense(1, kernel_init=torch_uniform_init(c), bias_init=torch_uniform_init(c), name="linear")(out)[:, 0]
