"""Micro-benchmark: the 5×5 depthwise convolution of NVAE's decoder cells on XLA:CPU.

  python experiments/benchmark_depthwise.py

Times forward and forward + both gradients for XLA's own grouped convolution and for our CPU fast
path (shifted multiply-adds with a hand-written VJP), on a 32×16×16×384 input, single device.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vaebm_jax.models.layers import conv2d  # noqa: E402


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
  print("| impl | forward (ms) | forward + d/dx + d/dw (ms) | d/dw only (ms) |\n|---|---|---|---|")
  for impl in ("xla", "fast_cpu"):
    f = lambda x, w, impl=impl: conv2d(x, w, padding=2, groups=384, impl=impl)
    loss = lambda x, w, f=f: jnp.sum(f(x, w) ** 2)
    print(f"| {impl} | {bench(f, x, w):.1f} | {bench(jax.grad(loss, argnums=(0, 1)), x, w):.1f} | "
          f"{bench(jax.grad(loss, argnums=1), x, w):.1f} |", flush=True)


if __name__ == "__main__":
  main()
