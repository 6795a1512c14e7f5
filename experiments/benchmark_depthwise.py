"""Micro-benchmark: the 5×5 depthwise convolution of NVAE's decoder cells on XLA:CPU.

  python experiments/benchmark_depthwise.py

Times forward and forward + both gradients on a 32×16×16×384 input, single device, for XLA's own
grouped convolution (`xla`), the native kernel that `conv2d` uses on CPU (`native`, models/native.py)
and its fallback where no kernel can be built (`shifted`: shifted multiply-adds with a hand-written
VJP). Also prints the forward's rate in GFMA/s (5·5·C multiply-adds per output pixel).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vaebm_jax.models import depthwise, layers  # noqa: E402


def bench(fn, *args, repeats=10):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) / repeats * 1e3


def main():
  x = jax.random.normal(jax.random.key(0), (32, 16, 16, 384))
  w = jax.random.normal(jax.random.key(1), (5, 5, 1, 384))
  impls = {"xla": lambda x, w: layers.conv2d(x, w, padding=2, groups=384, impl="xla"),
           "shifted": lambda x, w: depthwise.shifted_depthwise_conv(x, w[:, :, 0, :])}
  if depthwise.available():
    impls["native"] = lambda x, w: depthwise.native_depthwise_conv(x, w[:, :, 0, :])
  fmas = x.size * 25
  print("| impl | forward (ms) | forward GFMA/s | forward + d/dx + d/dw (ms) | d/dw only (ms) |\n|---|---|---|---|---|")
  for name, f in impls.items():
    loss = lambda x, w, f=f: jnp.sum(f(x, w) ** 2)
    forward = bench(f, x, w)
    both, kernel = bench(jax.grad(loss, argnums=(0, 1)), x, w), bench(jax.grad(loss, argnums=1), x, w)
    print(f"| {name} | {forward:.1f} | {fmas / forward / 1e6:.1f} | {both:.1f} | {kernel:.1f} |", flush=True)


if __name__ == "__main__":
  main()
