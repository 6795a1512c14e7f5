"""Primitive layers: every convolution implementation agrees; masks are causal; BN is PyTorch's."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaebm_jax import parallel
from vaebm_jax.models import depthwise, layers
from vaebm_jax.models.nvae import CellAR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [  # (name, x shape, kernel shape, stride, padding, groups)
    ("dense3x3", (2, 8, 8, 6), (3, 3, 6, 5), 1, 1, 1),
    ("dense5x5", (2, 6, 6, 4), (5, 5, 4, 3), 1, 2, 1),
    ("dense3x3_stride2", (2, 8, 8, 6), (3, 3, 6, 10), 2, 1, 1),
    ("pointwise", (2, 8, 8, 6), (1, 1, 6, 12), 1, 0, 1),
    ("pointwise_stride2", (2, 7, 7, 6), (1, 1, 6, 4), 2, 0, 1),
    ("depthwise5x5", (3, 8, 8, 12), (5, 5, 1, 12), 1, 2, 12),
    ("depthwise5x5_batch8", (8, 16, 16, 64), (5, 5, 1, 64), 1, 2, 64),
    ("depthwise5x5_nonsquare", (2, 5, 9, 7), (5, 5, 1, 7), 1, 2, 7),
    ("depthwise3x3", (2, 6, 6, 8), (3, 3, 1, 8), 1, 1, 8),
    ("depthwise7x7_tail_channels", (1, 9, 8, 40), (7, 7, 1, 40), 1, 3, 40),
    ("depthwise5x5_smaller_than_kernel", (2, 3, 2, 20), (5, 5, 1, 20), 1, 2, 20),
    ("pointwise_expand6", (4, 8, 8, 16), (1, 1, 16, 96), 1, 0, 1),
]


@pytest.mark.parametrize("name,xs,ws,stride,padding,groups", CASES, ids=[c[0] for c in CASES])
def test_every_conv_impl_gives_same_values_and_gradients(name, xs, ws, stride, padding, groups):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
  outs, grads = {}, {}
  for impl in ("xla", "fast_cpu"):
    f = functools.partial(layers.conv2d, stride=stride, padding=padding, groups=groups, impl=impl)
    outs[impl] = f(x, w)
    probe = jax.random.normal(kg, outs[impl].shape)
    grads[impl] = jax.grad(lambda x, w: jnp.sum(f(x, w) * probe), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(outs["fast_cpu"], outs["xla"], rtol=1e-5, atol=1e-4)
  for a, b in zip(grads["fast_cpu"], grads["xla"], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name,xs,ws,stride,padding,groups", [CASES[4], CASES[6]], ids=["pointwise", "depthwise5x5"])
def test_fast_cpu_gradients_under_jit_inside_scan(name, xs, ws, stride, padding, groups):
  """The hand-written VJPs (1×1 kernel gradient, row-scanned depthwise kernel gradient) agree with
  XLA's autodiff when jitted inside a `lax.scan` body, as in the NVAE's scanned latent groups."""
  kx, kw, kg = jax.random.split(jax.random.key(1), 3)
  x, w = jax.random.normal(kx, (3,) + xs), jax.random.normal(kw, ws)
  grads = {}
  for impl in ("xla", "fast_cpu"):
    f = functools.partial(layers.conv2d, stride=stride, padding=padding, groups=groups, impl=impl)

    def loss(x, w, f=f):
      def body(acc, xi):
        y = f(jax.nn.swish(xi), w)
        return acc + jnp.sum(jnp.sin(y)), None
      return jax.lax.scan(body, 0.0, x)[0]
    grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  for a, b in zip(grads["fast_cpu"], grads["xla"], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


DEPTHWISE = [c for c in CASES if c[0].startswith("depthwise")]


@pytest.mark.parametrize("name,xs,ws,stride,padding,groups", DEPTHWISE, ids=[c[0] for c in DEPTHWISE])
def test_both_cpu_depthwise_paths_match_xla(name, xs, ws, stride, padding, groups):
  """The native kernel (what conv2d uses on CPU when it can be built) and the shifted multiply-adds
  (its fallback) each give XLA's values and gradients, under jit."""
  assert depthwise.available(), "the native kernel did not build here (a C++ compiler is needed for the tests)"
  kx, kw, kg = jax.random.split(jax.random.key(2), 3)
  x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
  ref = functools.partial(layers.conv2d, stride=1, padding=padding, groups=groups, impl="xla")
  probe = jax.random.normal(kg, xs)
  for fn in (depthwise.native_depthwise_conv, depthwise.shifted_depthwise_conv):
    f = lambda x, w, fn=fn: fn(x, w[:, :, 0, :])
    np.testing.assert_allclose(jax.jit(f)(x, w), ref(x, w), rtol=1e-5, atol=1e-4)
    grads = [jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w)) * probe), argnums=(0, 1)))(x, w)
             for f in (f, ref)]
    for a, b in zip(*grads, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_native_depthwise_keeps_each_devices_share_of_the_batch():
  """Under a data-parallel jit (4 devices) the kernel runs on each device's quarter of the batch, with
  no gather of the activations, and the kernel gradient is summed over devices: the same values as on
  one device."""
  mesh = parallel.create_mesh()
  x = jax.random.normal(jax.random.key(3), (8, 6, 6, 24))
  w = jax.random.normal(jax.random.key(4), (5, 5, 24))
  loss = jax.jit(jax.grad(lambda x, w: jnp.sum(jax.nn.swish(depthwise.native_depthwise_conv(x, w)) ** 2),
                          argnums=(0, 1)))
  xs, ws = jax.device_put(x, parallel.data_sharded(mesh)), jax.device_put(w, parallel.replicated(mesh))
  hlo = loss.lower(xs, ws).compile().as_text()
  calls = [line for line in hlo.splitlines() if "custom_call_target=\"vaebm_depthwise" in line]
  assert len(calls) == 3 and all("f32[2,6,6,24]" in line for line in calls), calls
  assert "all-gather" not in hlo
  sharded, single = loss(xs, ws), loss(x, w)
  assert sharded[0].sharding.spec == parallel.data_sharded(mesh).spec
  for a, b in zip(sharded, single, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


_CACHED_PROGRAM = """
import jax, jax.numpy as jnp
jax.config.update("jax_num_cpu_devices", 4)
from vaebm_jax import parallel
from vaebm_jax.models import depthwise
mesh = parallel.create_mesh()
x = jax.device_put(jnp.ones((8, 6, 6, 24)), parallel.data_sharded(mesh))
jax.jit(lambda x: depthwise.native_depthwise_conv(x, jnp.ones((5, 5, 24)))).lower(x).compile()
"""


def test_sharded_native_kernel_program_is_found_in_the_persistent_cache(tmp_path):
  """With the tests' settings (tests/conftest.py), a second process compiling the same sharded program
  finds it in XLA's persistent cache: its custom_partitioning callback is not part of the key."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=ROOT)
  entries = []
  for _ in range(2):
    subprocess.run([sys.executable, "-c", _CACHED_PROGRAM], check=True, env=env, cwd=ROOT, capture_output=True)
    entries.append(sorted(p.name for p in tmp_path.iterdir()))
  assert any("lambda" in name for name in entries[0]), entries[0]
  assert entries[1] == entries[0]


def test_native_kernel_that_cannot_be_built_warns_and_falls_back(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", "false")
  monkeypatch.setenv("VAEBM_JAX_KERNEL_CACHE", str(tmp_path))
  with pytest.warns(UserWarning, match="could not be built"):
    assert depthwise.available.__wrapped__() is False
  assert list(tmp_path.iterdir()) == []                           # no half-written library left behind


def test_conv_impl_rejects_unknown_name():
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    layers.resolve_conv_impl("cudnn")
  with pytest.raises(ValueError, match="conv_dtype must be one of"):
    layers.conv_mode("auto", "float16")


@pytest.mark.parametrize("name,xs,ws,stride,padding,groups", [CASES[0], CASES[2], CASES[4], CASES[5]],
                         ids=["dense3x3", "dense3x3_stride2", "pointwise_stride2", "depthwise5x5"])
def test_bf16_conv_rounds_operands_accumulates_in_float32_and_differentiates_in_bf16(
    name, xs, ws, stride, padding, groups):
  """conv_mode(impl, 'bfloat16'): the output is the float32 convolution of the bf16-rounded operands
  (bf16 products are exact in float32), and the backward pass's convolutions take bf16 operands; its
  gradients are within bf16 rounding of the float32 ones."""
  kx, kw, kg = jax.random.split(jax.random.key(2), 3)
  x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
  mode = layers.conv_mode("auto", "bfloat16")
  f = functools.partial(layers.conv2d, stride=stride, padding=padding, groups=groups, impl=mode)
  f32 = functools.partial(layers.conv2d, stride=stride, padding=padding, groups=groups, impl="xla")
  rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  out = jax.jit(f)(x, w)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, f32(rounded(x), rounded(w)), rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(out - f32(x, w))) > 1e-4                   # and the rounding is really there
  probe = jax.random.normal(kg, out.shape)
  grad = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(f(x, w)) * probe), argnums=(0, 1)))
  exact = jax.grad(lambda x, w: jnp.sum(jnp.sin(f32(x, w)) * probe), argnums=(0, 1))(x, w)
  for a, b in zip(grad(x, w)[1], exact, strict=True):
    assert a.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 3e-2
  convs = [line for line in grad.lower(x, w).as_text().splitlines() if "stablehlo.convolution" in line]
  assert len(convs) == 3 and all(line.rsplit("->", 1)[0].count("xbf16>") == 2 for line in convs), convs


def test_autoregressive_flow_cell_is_causal_in_raster_and_channel_order():
  """∂out[p, c] / ∂z[q, c'] = 0 unless q precedes p, or q = p and c' < c (the flow is triangular)."""
  cell = CellAR(num_z=2, mirror=False, expansion=6)
  z = jax.random.normal(jax.random.key(1), (1, 4, 4, 2))
  params = cell.init(jax.random.key(2), z)
  jac = jax.jacobian(lambda z: cell.apply(params, z))(z)[0].reshape(16, 2, 16, 2)  # p, c, q, c'
  for p in range(16):
    for c in range(2):
      for q in range(16):
        for c2 in range(2):
          identity = 1.0 if (p == q and c == c2) else 0.0
          allowed = q < p or (q == p and c2 < c)
          if not allowed:
            assert abs(jac[p, c, q, c2] - identity) < 1e-6, (p, c, q, c2)
  # and the flow is not trivially the identity
  assert np.abs(jac.reshape(32, 32) - np.eye(32)).max() > 1e-4


def test_mirrored_flow_cell_is_causal_in_reverse_raster_order():
  cell = CellAR(num_z=1, mirror=True, expansion=6)
  z = jax.random.normal(jax.random.key(1), (1, 3, 3, 1))
  params = cell.init(jax.random.key(2), z)
  jac = jax.jacobian(lambda z: cell.apply(params, z))(z)[0].reshape(9, 9)
  for p in range(9):
    for q in range(9):
      if q <= p:
        assert abs(jac[p, q] - (1.0 if p == q else 0.0)) < 1e-6


def test_batchnorm_matches_pytorch_semantics():
  """Biased variance normalises; the running variance tracks the unbiased one with momentum 0.05."""
  bn = layers.BatchNorm()
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 3.0 + 1.0
  variables = bn.init(jax.random.key(1), x, False)
  y, updates = bn.apply(variables, x, False, mutable=["batch_stats"])
  xs = np.asarray(x).reshape(-1, 2)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 2),
                             (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.95 + 0.05 * xs.var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.05 * xs.mean(0), rtol=1e-5, atol=1e-6)


def test_bilinear_upsampling_aligns_corners():
  ramp = jnp.arange(4.0)[None, :, None, None] * jnp.ones((1, 4, 3, 1))
  up = layers.upsample_bilinear_align_corners(ramp)
  np.testing.assert_allclose(up[0, :, 0, 0], np.linspace(0, 3, 8), atol=1e-6)
  assert up.shape == (1, 8, 6, 1)


@pytest.mark.parametrize("cell_type,c_in,c_out,hw_out", [
    ("normal_enc", 8, 8, 8), ("down_enc", 8, 16, 4), ("normal_dec", 8, 8, 8), ("up_dec", 8, 4, 16),
    ("normal_pre", 8, 8, 8), ("down_pre", 8, 16, 4), ("normal_post", 8, 8, 8), ("up_post", 8, 4, 16)])
def test_cell_shapes(cell_type, c_in, c_out, hw_out):
  cell = layers.Cell(c_out, cell_type, layers.ARCH_CELLS["res_mbconv"][cell_type])
  x = jnp.ones((2, 8, 8, c_in))
  out, _ = cell.init_with_output(jax.random.key(0), x, True)
  assert out.shape == (2, hw_out, hw_out, c_out)


@pytest.mark.parametrize("train", [False, True])
def test_rematerialised_cells_keep_fewer_activations_and_the_same_gradients(train):
  """`nn.remat` cells compiled with `parallel.compiler_options(remat=True)`: XLA:CPU keeps far fewer
  temporaries for the gradient (it used to merge the recomputation back into the forward pass).
  "keep_convs" (stage 1: training-mode BN, parameter gradients) keeps the convolutions' outputs:
  fewer temporaries than without remat, more than "all"."""
  import flax.linen as nn

  from vaebm_jax import parallel
  from vaebm_jax.models.nvae import ARCH_CELLS, REMAT_MODES, _cell_class

  arch = ARCH_CELLS["res_mbconv"]["normal_dec"]

  class Stack(nn.Module):
    remat: str

    @nn.compact
    def __call__(self, x):
      for i in range(6):
        x = _cell_class(self.remat)(32, "normal_dec", arch, True, "auto", name=f"cell_{i}")(x, train)
      return jnp.sum(x ** 2)

  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 32))
  variables = Stack("off").init(jax.random.key(0), x)

  def grad(model):
    if not train:                                  # stage 2: the input gradient through a frozen stack
      return jax.grad(lambda x, v: model.apply(v, x))
    return lambda x, v: jax.grad(lambda p: model.apply({**v, "params": p}, x, mutable=["batch_stats"])[0])(
        v["params"])

  temps, grads = {}, {}
  for remat in REMAT_MODES:
    compiled = jax.jit(grad(Stack(remat)), compiler_options=parallel.compiler_options(remat != "off")).lower(
        x, variables).compile()
    temps[remat] = compiled.memory_analysis().temp_size_in_bytes
    grads[remat] = jax.tree.leaves(compiled(x, variables))
  for remat in REMAT_MODES[1:]:
    for a, b in zip(grads[remat], grads["off"], strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  if jax.default_backend() == "cpu":
    assert temps["all"] < 0.5 * temps["off"], temps
    if train:
      assert temps["all"] < temps["keep_convs"] < 0.8 * temps["off"], temps


def test_swish_has_nn_swish_values_and_a_float32_accurate_derivative():
  import flax.linen as nn
  x = jnp.concatenate([jnp.linspace(-40.0, 40.0, 8001), jnp.array([-1e4, -100.0, 100.0, 1e4])])
  np.testing.assert_array_equal(layers.swish(x), nn.swish(x))
  d = np.asarray(jax.vmap(jax.grad(layers.swish))(x))
  x64 = np.asarray(x, np.float64)
  s = 0.5 * (1 + np.tanh(0.5 * x64))                                  # sigmoid, without overflow
  exact = s * (1 + x64 * (1 - s))
  # float32 rounding of 1 − s, times x: up to 5e-6 at |x| = 40 (nn.swish's autodiff: 2e-6), not O(0.1)
  assert np.abs(d - exact).max() < 1e-5
  _, jvp = jax.jvp(layers.swish, (x,), (jnp.ones_like(x),))           # forward mode too
  np.testing.assert_array_equal(jvp, d)
  mid = x[3000:5001]                                                   # |x| <= 10: differentiable again
  d2 = jax.vmap(jax.grad(jax.grad(layers.swish)))(mid)
  np.testing.assert_allclose(d2, jax.vmap(jax.grad(jax.grad(nn.swish)))(mid), rtol=1e-3, atol=1e-5)


def test_frozen_decoder_cells_keep_two_expanded_tensors_per_cell_for_the_input_gradient(monkeypatch):
  """The Langevin chain's case: eval-mode cells, gradient in the input only. `layers.swish` lets XLA keep
  the expand conv's and the depthwise conv's outputs (2 tensors of 6× width per cell); with `nn.swish`
  it also kept both sigmoids (4 per cell), 3.56 GB instead of 2.05 GB per device at CIFAR-10 batch 16.
  The fused eval-mode kernel (`depthwise.native_dwcell`, what the CPU runs) keeps only the first."""
  import flax.linen as nn

  from vaebm_jax.models.nvae import ARCH_CELLS, _cell_class

  arch, cells, b, hw, c = ARCH_CELLS["res_mbconv"]["normal_dec"], 6, 8, 16, 32

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(cells):
        x = _cell_class("off")(c, "normal_dec", arch, True, "auto", name=f"cell_{i}")(x, False)
      return jnp.sum(x ** 2)

  x = jax.random.normal(jax.random.key(1), (b, hw, hw, c))
  variables = Stack().init(jax.random.key(0), x)
  temps, grads = {}, {}

  def measure(name):
    compiled = jax.jit(jax.grad(lambda x, v: Stack().apply(v, x))).lower(x, variables).compile()
    temps[name] = compiled.memory_analysis().temp_size_in_bytes
    grads[name] = np.asarray(compiled(x, variables))

  measure("fused")
  monkeypatch.setattr(depthwise, "dwcell_supported", lambda *_: False)
  for name, fn in (("layers", layers.swish), ("nn", nn.swish)):
    monkeypatch.setattr(layers, "swish", fn)
    measure(name)
  np.testing.assert_allclose(grads["layers"], grads["nn"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads["fused"], grads["nn"], rtol=1e-5, atol=1e-6)
  if jax.default_backend() == "cpu":
    expanded = b * hw * hw * 6 * c * 4
    assert temps["layers"] <= (2 * cells + 4) * expanded < temps["nn"], (temps, expanded)
    assert temps["fused"] <= (cells + 4) * expanded, (temps, expanded)   # the fused kernel keeps x only


def test_native_depthwise_under_vmap_gives_per_example_values_and_gradients():
  """`jax.vmap` (per-example gradients, `jax.jacobian`) folds the mapped axis into the kernel's batch, or
  falls back to the shifted multiply-adds where it cannot (the kernel gradient)."""
  x = jax.random.normal(jax.random.key(5), (3, 2, 6, 6, 20))
  w = jax.random.normal(jax.random.key(6), (5, 5, 20))
  per_example = lambda fn: jax.vmap(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1)),
                                    in_axes=(0, None))
  got, want = per_example(depthwise.native_depthwise_conv)(x, w), per_example(depthwise.shifted_depthwise_conv)(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


DWCELL_CASES = [  # (x shape, kernel size): vector blocks and single pixels, channel blocks and their tail
    ((3, 9, 11, 48), 5),
    ((2, 16, 16, 144), 5),      # 128 + 16 channels: two work units of different widths per image
    ((1, 4, 3, 16), 5),         # smaller than the kernel
    ((2, 8, 8, 32), 3),
    ((1, 10, 9, 16), 7),
    ((1, 40, 12, 16), 5),       # one image, one channel block: split into bands of rows
    ((1, 64, 8, 32), 3),
    ((1, 8, 200, 64), 5),       # a wide image: narrower channel blocks
]


def _dwcell_args(xs, k, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  c = xs[-1]
  x = 2 * jax.random.normal(keys[0], xs)
  w = 0.3 * jax.random.normal(keys[1], (k, k, c))
  return (x, w) + tuple(jax.random.normal(kk, (c,)) for kk in keys[2:])


@pytest.mark.parametrize("xs,k", DWCELL_CASES, ids=[f"{'x'.join(map(str, c[0]))}_k{c[1]}" for c in DWCELL_CASES])
def test_fused_cell_kernel_matches_xla_values_and_every_gradient(xs, k):
  """`native_dwcell` = swish(a2 · dw(swish(a1 · x + b1), w) + b2), and its VJP (the native input gradient,
  the XLA parameter gradients) matches autodiff of that expression."""
  args = _dwcell_args(xs, k)
  probe = jax.random.normal(jax.random.key(9), xs)
  np.testing.assert_allclose(jax.jit(depthwise.native_dwcell)(*args), depthwise.reference_dwcell(*args),
                             rtol=1e-5, atol=1e-5)
  grad = lambda fn: jax.jit(jax.grad(lambda *a: jnp.vdot(fn(*a), probe), argnums=tuple(range(6))))(*args)
  for name, got, want in zip(("x", "w", "a1", "b1", "a2", "b2"), grad(depthwise.native_dwcell),
                             grad(depthwise.reference_dwcell), strict=True):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale, err_msg=name)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_fused_cell_kernel_passes_non_finite_values_on_like_xla(bad):
  """A NaN or infinity in x makes the output and the input gradient non-finite, as XLA's cell does (the
  stage loops skip such updates: `loop.keep_if_finite`); a huge finite x stays finite (the exp clamps)."""
  x, w, *bn = _dwcell_args((1, 6, 6, 16), 5, seed=4)
  x = x.at[0, 3, 3, 5].set(bad)
  for fn in (depthwise.native_dwcell, depthwise.reference_dwcell):
    value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, w, *bn)))(x)
    assert bool(jnp.isfinite(value)) == bool(jnp.all(jnp.isfinite(grad))) == np.isfinite(bad), fn


def test_fused_cell_kernel_keeps_each_devices_share_of_the_batch():
  """Under a data-parallel jit (4 devices) both kernels run on each device's quarter of the batch, with no
  gather, and give the values of one device."""
  mesh = parallel.create_mesh()
  x, w, a1, b1, a2, b2 = _dwcell_args((8, 6, 6, 32), 5, seed=1)
  probe = jax.random.normal(jax.random.key(2), x.shape)
  fn = jax.jit(jax.value_and_grad(lambda x, p: jnp.vdot(depthwise.native_dwcell(x, w, a1, b1, a2, b2), p)))
  xs, ps = (jax.device_put(a, parallel.data_sharded(mesh)) for a in (x, probe))
  hlo = fn.lower(xs, ps).compile().as_text()
  calls = [line for line in hlo.splitlines() if "custom_call_target=\"vaebm_dwcell" in line]
  assert len(calls) == 2 and all("f32[2,6,6,32]" in line for line in calls), calls
  assert "all-gather" not in hlo
  assert "vaebm_depthwise" not in hlo          # the parameters' gradient code is dead here, and removed
  (value, gx), (value1, gx1) = fn(xs, ps), fn(x, probe)
  assert gx.sharding.spec == parallel.data_sharded(mesh).spec
  np.testing.assert_allclose(value, value1, rtol=1e-5)
  np.testing.assert_allclose(gx, gx1, rtol=1e-5, atol=1e-5)


def test_fused_cell_kernel_under_vmap():
  """`jax.vmap` over the images folds into the kernels' batch; over the kernel (or BN) it runs XLA code."""
  x, w, a1, b1, a2, b2 = _dwcell_args((3, 2, 6, 5, 16), 5, seed=3)
  for fn_axes in ((0, None), (None, 0)):
    ws = w if fn_axes[1] is None else jnp.stack([w, -w, 0.5 * w])
    xs = x if fn_axes[0] == 0 else x[0]
    per = lambda cell: jax.vmap(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(cell(x, w, a1, b1, a2, b2))),
                                                   argnums=(0, 1)), in_axes=fn_axes)(xs, ws)
    fused, unfused = per(depthwise.native_dwcell), per(depthwise.reference_dwcell)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(unfused), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels,fused", [(32, True), (20, False)])
def test_eval_mode_inverted_residual_uses_the_fused_kernel_where_it_can(channels, fused, monkeypatch):
  """An eval-mode decoder cell (expansion 6: 192 or 120 channels) on CPU runs the fused kernel where C is a
  multiple of 16, with the values and gradients (input and every parameter) of the unfused cell; training
  mode and other widths run the unfused code."""
  cell = layers.InvertedResidual(channels, stride=1, expansion=6, kernel_size=5)
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, channels))
  variables = cell.init(jax.random.key(5), x, train=False)
  stats = jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(jax.random.key(6), v.shape), variables["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": stats}

  def run(train):
    def loss(p, x):
      if train:
        out, _ = cell.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
      else:
        out = cell.apply({"params": p, "batch_stats": stats}, x, train=False)
      return jnp.sum(jnp.sin(out))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  grad_fn = run(False)
  assert ("vaebm_dwcell" in grad_fn.lower(variables["params"], x).as_text()) == fused
  assert "vaebm_dwcell" not in run(True).lower(variables["params"], x).as_text()
  got = grad_fn(variables["params"], x)
  monkeypatch.setenv("VAEBM_JAX_FUSED_CELLS", "0")
  unfused_fn = run(False)
  assert "vaebm_dwcell" not in unfused_fn.lower(variables["params"], x).as_text()
  want = unfused_fn(variables["params"], x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(b)))))


_OTHER_BUILD_PROGRAM = """
import subprocess, sys
import jax, jax.numpy as jnp
from vaebm_jax.models import depthwise
so, march = sys.argv[1:3]
cmd = depthwise._compile_command("g++", so)
cmd[cmd.index("-march=native")] = f"-march={march}"
subprocess.run(cmd, check=True)
depthwise._library_path = lambda compiler: so
assert depthwise.available()
worst = 0.0
for shape, k in [((2, 9, 11, 48), 5), ((1, 16, 16, 144), 5), ((1, 4, 3, 24), 3)]:
  keys = jax.random.split(jax.random.key(2), 7)
  args = (2 * jax.random.normal(keys[0], shape), 0.3 * jax.random.normal(keys[1], (k, k, shape[-1]))) + tuple(
      jax.random.normal(kk, (shape[-1],)) for kk in keys[2:6])
  probe = jax.random.normal(keys[6], shape)
  for cell, plain in ((depthwise.native_dwcell, depthwise.reference_dwcell),
                      (lambda x, w, *_: depthwise.native_depthwise_conv(x, w),
                       lambda x, w, *_: depthwise.shifted_depthwise_conv(x, w))):
    f = lambda fn: jax.jit(jax.value_and_grad(lambda *a: jnp.vdot(fn(*a), probe), argnums=(0, 1)))(*args)
    for u, v in zip(jax.tree.leaves(f(cell)), jax.tree.leaves(f(plain))):
      worst = max(worst, float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))))
print(worst)
"""


@pytest.mark.skipif("avx2" not in depthwise._cpu_flags().split(), reason="needs an x86 CPU with AVX2")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_other_builds_of_the_native_kernels_give_the_same_numbers(tmp_path, march):
  """Hosts differ (Zen 3: AVX2 only; this project's others: AVX-512): the kernels built for AVX2 (8 lanes,
  the AVX reciprocal estimate; `haswell`) and without any AVX (the portable code that ARM hosts also
  build: a division, plain stores; `x86-64`) give the values and gradients of the XLA code too."""
  out = subprocess.run([sys.executable, "-c", _OTHER_BUILD_PROGRAM, str(tmp_path / "kernels.so"), march], check=True,
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert float(out.stdout.split()[-1]) < 2e-6, out.stdout
