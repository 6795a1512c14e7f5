"""The depthwise k×k convolution of NVAE's cells on CPU: a native kernel through `jax.ffi`, and XLA code.

XLA:CPU emits no fast code for depthwise convolutions (jax-ml/jax#23713), and they decide the speed of
the decoder on a CPU (experiments/RESULTS.md, issue 10). `depthwise_conv` picks, per call:

- `native_depthwise_conv`: `csrc/depthwise.cc`, a small vectorised kernel. This module builds it
  with the host's C++ compiler on first use (`-O3 -march=native`, a few seconds, cached under
  `$VAEBM_JAX_KERNEL_CACHE` or `~/.cache/vaebm_jax`, keyed by the source, the jaxlib version, the
  compiler and the CPU's flags) and registers it with XLA. Its VJP: the input gradient is the same
  kernel with w flipped, the kernel gradient its own handler. Both handlers carry a
  `custom_partitioning` rule, so under a data-parallel `jit` each device runs its own share of the
  batch (the kernel gradient is summed over the data axes) instead of XLA gathering the batch onto
  every device. First derivatives only: nothing in VAEBM differentiates through the NVAE twice (the
  Langevin chains are cut from the EBM's loss), and the kernels have no rule for a second.
- `shifted_depthwise_conv`: k² shifted multiply-adds that XLA fuses, with a hand-written VJP made of
  the same; used where the kernel is not `available()`: no compiler, a failed build (one warning says
  why), `VAEBM_JAX_NATIVE_KERNELS=0`, or a dtype or kernel size it does not handle.

`native_dwcell` is the same library's second kernel pair: an eval-mode decoder cell's BN → Swish →
depthwise → BN → Swish in one pass each way (`layers.InvertedResidual` uses it where
`dwcell_supported`; `VAEBM_JAX_FUSED_CELLS=0` turns it off); its section below says how.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "depthwise.cc")
_FWD, _WGRAD = "vaebm_depthwise_fwd", "vaebm_depthwise_wgrad"
_CELL_FWD, _CELL_BWD = "vaebm_dwcell_fwd", "vaebm_dwcell_bwd"


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _compile_command(compiler: str, out: str) -> list:
  return [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
          "-I", jax.ffi.include_dir(), _SOURCE, "-o", out]


def _library_path(compiler: str) -> str:
  import jaxlib
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), compiler.encode(),
                                   _cpu_flags().encode()])).hexdigest()[:16]
  root = os.environ.get("VAEBM_JAX_KERNEL_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vaebm_jax")
  return os.path.join(root, f"depthwise-{key}.so")


def _build(compiler: str, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  try:
    result = subprocess.run(_compile_command(compiler, tmp), capture_output=True, text=True)
    if result.returncode:
      lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
      raise RuntimeError(f"{compiler} failed: {next((ln for ln in lines if 'error' in ln), lines[-1]).strip()}")
    os.replace(tmp, path)            # atomic: concurrent builds (test workers) each install a whole file
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@functools.cache
def available() -> bool:
  """Builds (once per host and source), loads and registers the kernels; False if that is not possible."""
  if os.environ.get("VAEBM_JAX_NATIVE_KERNELS", "1") == "0":
    return False
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
  if compiler is None:
    warnings.warn("vaebm_jax: no C++ compiler found, so depthwise convolutions on CPU use the slower "
                  "XLA path; install g++ (apt-get install g++) for the native kernel", stacklevel=2)
    return False
  try:
    path = _library_path(compiler)
    if not os.path.exists(path):
      _build(compiler, path)
    library = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(library.VaebmDepthwiseFwd), platform="cpu")
    jax.ffi.register_ffi_target(_WGRAD, jax.ffi.pycapsule(library.VaebmDepthwiseWgrad), platform="cpu")
    jax.ffi.register_ffi_target(_CELL_FWD, jax.ffi.pycapsule(library.VaebmDwCellFwd), platform="cpu")
    jax.ffi.register_ffi_target(_CELL_BWD, jax.ffi.pycapsule(library.VaebmDwCellBwd), platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    warnings.warn(f"vaebm_jax: the native depthwise kernel could not be built ({e}); depthwise "
                  "convolutions on CPU use the slower XLA path", stacklevel=2)
    return False
  return True


# ----------------------------------------------------------------------------------------------
# Depthwise convolution as k*k shifted multiply-adds, with a hand-written VJP that is itself made
# of shifted multiply-adds (autodiff of slices would produce scatter-adds).
# ----------------------------------------------------------------------------------------------


def _shifted_sum(xp: jax.Array, w: jax.Array, height: int, width: int) -> jax.Array:
  k = w.shape[0]
  out = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i:i + height, j:j + width, :] * w[i, j]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def shifted_depthwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 'same' depthwise conv. x: (B, H, W, C); w: (k, k, C) with k odd."""
  p = (w.shape[0] - 1) // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return _shifted_sum(xp, w, x.shape[1], x.shape[2])


def _shifted_fwd(x, w):
  return shifted_depthwise_conv(x, w), (x, w)


def _shifted_kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  """dw[i, j, c] = Σ_{b,h,w} xp[b, h+i, w+j, c] · g[b, h, w, c], xp = x zero-padded by (k - 1) / 2.

  Written with the roles of kernel and image swapped: a `lax.scan` over the rows h of g adds, for
  each column w, the k×k window of xp at (h, w) times g[:, h, w] into a (B, k, k, C) accumulator.
  Each step is one fused loop over k rows of xp and one row of g, so xp is read about k times and g
  once, where k² separate product-and-reduce passes (one per shift) read both k² times: 2-4× faster
  on XLA:CPU for the decoder's expanded (B, H, W, 6C) activations, and no (B, H, W, C) products.
  """
  batch, height, width, channels = g.shape
  p = (k - 1) // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))

  def row(acc, h):
    x_rows = jax.lax.dynamic_slice_in_dim(xp, h, k, axis=1)  # (B, k, W + k - 1, C)
    g_row = jax.lax.dynamic_slice_in_dim(g, h, 1, axis=1)    # (B, 1, W, C)
    for w in range(width):
      acc = acc + x_rows[:, :, w:w + k, :] * g_row[:, :, w:w + 1, :]
    return acc, None

  acc, _ = jax.lax.scan(row, jnp.zeros((batch, k, k, channels), g.dtype), jnp.arange(height))
  return jnp.sum(acc, axis=0)


def _shifted_bwd(res, g):
  x, w = res
  k = w.shape[0]
  p = (k - 1) // 2
  height, width = x.shape[1], x.shape[2]
  gp = jnp.pad(g, ((0, 0), (p, p), (p, p), (0, 0)))
  dx = _shifted_sum(gp, w[::-1, ::-1], height, width)
  return dx, _shifted_kernel_grad(x, g, k).astype(w.dtype)


shifted_depthwise_conv.defvjp(_shifted_fwd, _shifted_bwd)


# ----------------------------------------------------------------------------------------------
# The native kernel: the calls, and how each is split over a data-parallel mesh: the batch axis stays where it is, the
# other axes and the kernel are gathered whole to every device.
# ----------------------------------------------------------------------------------------------


def _require() -> None:
  if not available():
    raise RuntimeError("the native depthwise kernel is not available here (see the warning above); use "
                       "depthwise_conv, which falls back to XLA code")


def _forward_call(x: jax.Array, w: jax.Array) -> jax.Array:
  _require()
  return jax.ffi.ffi_call(_FWD, jax.ShapeDtypeStruct(x.shape, x.dtype))(x, w)


def _kernel_grad_call(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  _require()
  return jax.ffi.ffi_call(_WGRAD, jax.ShapeDtypeStruct((k, k, x.shape[-1]), x.dtype))(x, g)


def _batch_axes(sharding) -> Optional[object]:
  spec = getattr(sharding, "spec", None)
  return spec[0] if spec else None


def _batch_sharded(mesh, axes) -> NamedSharding:
  return NamedSharding(mesh, P(axes))


def _image_sharding(mesh, args, result):
  return _batch_sharded(mesh, _batch_axes(args[0].sharding))


def _image_partition(call, images: int):
  """custom_partitioning rule of `call`, whose first `images` operands and result are (B, H, W, C) images
  split over the batch as they come, and whose other operands (kernels, BN) are replicated."""
  def partition(mesh, args, result):
    batch = _image_sharding(mesh, args, result)
    return mesh, call, batch, (batch,) * images + (NamedSharding(mesh, P()),) * (len(args) - images)
  return partition


_forward = custom_partitioning(_forward_call)
_forward.def_partition(infer_sharding_from_operands=_image_sharding, partition=_image_partition(_forward_call, 1),
                       sharding_rule="b h w c, i j c -> b h w c")


def _kernel_grad_partition(k: int, mesh, args, result):
  axes = _batch_axes(args[0].sharding)

  def lower(x, g):
    dw = _kernel_grad_call(x, g, k)
    return dw if axes is None else jax.lax.psum(dw, axes)

  return mesh, lower, NamedSharding(mesh, P()), (_batch_sharded(mesh, axes), _batch_sharded(mesh, axes))


def _make_kernel_grad(k: int):
  def call(x, g):
    return _kernel_grad_call(x, g, k)

  fn = custom_partitioning(call)
  fn.def_partition(infer_sharding_from_operands=lambda mesh, args, result: NamedSharding(mesh, P()),
                   partition=functools.partial(_kernel_grad_partition, k),
                   sharding_rule="b h w c, b h w c -> i j c")
  return fn


_KERNEL_GRADS = {k: _make_kernel_grad(k) for k in (1, 3, 5, 7)}


# custom_partitioning has no batching rule: under `jax.vmap` (e.g. `jax.jacobian`) the kernels fold
# the mapped axis into the batch where only their image operands are mapped; what cannot be folded (a
# mapped kernel or BN, the kernel gradient, which sums over the batch) runs XLA code instead.


def _fold_vmap(call, xla_code, images: int):
  """vmap rule of `call`, whose first `images` operands and result are (B, H, W, C) images."""
  def rule(axis_size, in_batched, *args):
    mapped = [a if m else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, m in zip(args, in_batched, strict=True)]
    if not any(in_batched[images:]):
      out = call(*(a.reshape((-1,) + a.shape[2:]) for a in mapped[:images]), *args[images:])
      return out.reshape(mapped[0].shape), True
    return jax.vmap(xla_code)(*mapped), True
  return rule


@jax.custom_batching.custom_vmap
def _forward_mapped(x: jax.Array, w: jax.Array) -> jax.Array:
  return _forward(x, w)


_forward_mapped.def_vmap(_fold_vmap(_forward_mapped, shifted_depthwise_conv, 1))


@jax.custom_batching.custom_vmap
def _kernel_grad_mapped(x: jax.Array, g: jax.Array, w: jax.Array) -> jax.Array:
  return _KERNEL_GRADS[w.shape[0]](x, g)         # w only for its shape


@_kernel_grad_mapped.def_vmap
def _kernel_grad_vmap(axis_size, in_batched, x, g, w):
  fn = functools.partial(_shifted_kernel_grad, k=w.shape[-3])
  return jax.vmap(fn, in_axes=(0 if in_batched[0] else None, 0 if in_batched[1] else None))(x, g), True


@jax.custom_vjp
def native_depthwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 'same' depthwise conv on CPU. x: (B, H, W, C) float32; w: (k, k, C), k odd ≤ 7."""
  return _forward_mapped(x, w)


def _fwd(x, w):
  return _forward_mapped(x, w), (x, w)


def _bwd(res, g):
  x, w = res
  return _forward_mapped(g, w[::-1, ::-1]), _kernel_grad_mapped(x, g, w)


native_depthwise_conv.defvjp(_fwd, _bwd)


def depthwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 'same' depthwise conv for the CPU. x: (B, H, W, C); w: (k, k, C) with k odd.

  The native kernel where it can run this call (float32, k ≤ 7, on CPU, built), else the shifted
  multiply-adds."""
  if w.dtype == x.dtype and _native_runs(x, w.shape[0]):
    return native_depthwise_conv(x, w)
  return shifted_depthwise_conv(x, w)


def _native_runs(x: jax.Array, kernel_size: int) -> bool:
  """Whether the native kernels take x with a k×k kernel: float32, k odd ≤ 7, on CPU, built."""
  return (x.dtype == jnp.float32 and kernel_size in _KERNEL_GRADS and jax.default_backend() == "cpu"
          and available())


# ----------------------------------------------------------------------------------------------
# The middle of an eval-mode inverted-residual cell as one kernel (csrc/depthwise.cc, "dwcell"):
# y = swish(a2 · dw(swish(a1 · x + b1), w) + b2), the two BatchNorms in eval mode being the per-channel
# affine maps (a1, b1) and (a2, b2). Unfused, XLA makes a separate pass over the expanded tensor for
# each BN-Swish and for each of their derivatives; the Langevin chain's cells are bound by those
# passes (experiments/RESULTS.md, issue 10). The backward kernel gives the input gradient from x and
# the output's cotangent, recomputing the depthwise output rather than keeping it; the gradients of w,
# a1, b1, a2 and b2 are autodiff of the unfused cell, which XLA removes where nothing uses them (a
# Langevin chain differentiates with respect to ε only).
# ----------------------------------------------------------------------------------------------

# Channels per vector on the widest CPU the kernel is built for (AVX-512); the kernel needs C to be a
# multiple of its vector width.
_CELL_CHANNEL_MULTIPLE = 16


def reference_dwcell(x: jax.Array, w: jax.Array, a1, b1, a2, b2) -> jax.Array:
  """What the fused kernel computes, in XLA code: swish(a2 · dw(swish(a1 · x + b1), w) + b2)."""
  return jax.nn.swish(a2 * shifted_depthwise_conv(jax.nn.swish(a1 * x + b1), w) + b2)


def dwcell_supported(x: jax.Array, kernel_size: int) -> bool:
  """Whether the models use `native_dwcell` on x with a k×k kernel: where the native kernels run
  (`_native_runs`), C a multiple of 16, and not turned off with `VAEBM_JAX_FUSED_CELLS=0` (read when a
  function is traced; for comparisons)."""
  return (os.environ.get("VAEBM_JAX_FUSED_CELLS", "1") != "0" and x.shape[-1] % _CELL_CHANNEL_MULTIPLE == 0
          and _native_runs(x, kernel_size))


def _cell_forward_call(x, w, a1, b1, a2, b2):
  _require()
  return jax.ffi.ffi_call(_CELL_FWD, jax.ShapeDtypeStruct(x.shape, x.dtype))(x, w, a1, b1, a2, b2)


def _cell_backward_call(x, gy, w, wf, a1, b1, a2, b2):
  _require()
  return jax.ffi.ffi_call(_CELL_BWD, jax.ShapeDtypeStruct(x.shape, x.dtype))(x, gy, w, wf, a1, b1, a2, b2)


_cell_forward = custom_partitioning(_cell_forward_call)
_cell_forward.def_partition(infer_sharding_from_operands=_image_sharding,
                            partition=_image_partition(_cell_forward_call, 1),
                            sharding_rule="b h w c, i j c, c, c, c, c -> b h w c")
_cell_backward = custom_partitioning(_cell_backward_call)
_cell_backward.def_partition(infer_sharding_from_operands=_image_sharding,
                             partition=_image_partition(_cell_backward_call, 2),
                             sharding_rule="b h w c, b h w c, i j c, i j c, c, c, c, c -> b h w c")


def _cell_input_grad(x, gy, w, wf, a1, b1, a2, b2):
  """What the backward kernel computes, in XLA code (wf, the flipped w, is the kernel's operand only)."""
  return jax.vjp(lambda x: reference_dwcell(x, w, a1, b1, a2, b2), x)[1](gy)[0]


@jax.custom_batching.custom_vmap
def _cell_forward_mapped(x, w, a1, b1, a2, b2):
  return _cell_forward(x, w, a1, b1, a2, b2)


_cell_forward_mapped.def_vmap(_fold_vmap(_cell_forward_mapped, reference_dwcell, 1))


@jax.custom_batching.custom_vmap
def _cell_backward_mapped(x, gy, w, wf, a1, b1, a2, b2):
  return _cell_backward(x, gy, w, wf, a1, b1, a2, b2)


_cell_backward_mapped.def_vmap(_fold_vmap(_cell_backward_mapped, _cell_input_grad, 2))


@jax.custom_vjp
def native_dwcell(x: jax.Array, w: jax.Array, a1: jax.Array, b1: jax.Array, a2: jax.Array,
                  b2: jax.Array) -> jax.Array:
  """swish(a2 · dw(swish(a1 · x + b1), w) + b2) on CPU in one kernel each way. x: (B, H, W, C) float32 with
  C a multiple of 16; w: (k, k, C), k odd ≤ 7; a1, b1, a2, b2: (C,). The backward pass keeps only x (and
  the parameters) and recomputes the rest. First derivatives only."""
  return _cell_forward_mapped(x, w, a1, b1, a2, b2)


def _dwcell_fwd(x, w, a1, b1, a2, b2):
  return _cell_forward_mapped(x, w, a1, b1, a2, b2), (x, w, a1, b1, a2, b2)


def _dwcell_bwd(res, gy):
  x, w, a1, b1, a2, b2 = res
  gx = _cell_backward_mapped(x, gy, w, w[::-1, ::-1], a1, b1, a2, b2)
  # The parameters' gradients: autodiff of the unfused cell (on the plain native kernel), which XLA
  # removes as dead code where nothing uses them.
  def unfused(w, a1, b1, a2, b2):
    return jax.nn.swish(a2 * native_depthwise_conv(jax.nn.swish(a1 * x + b1), w) + b2)

  return (gx,) + jax.vjp(unfused, w, a1, b1, a2, b2)[1](gy)


native_dwcell.defvjp(_dwcell_fwd, _dwcell_bwd)
