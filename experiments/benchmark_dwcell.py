"""Micro-benchmark: an eval-mode decoder cell's BN-Swish → depthwise 5×5 → BN-Swish on XLA:CPU, fused
(`depthwise.native_dwcell`, what eval mode runs on CPU) against unfused (the native depthwise kernel with
XLA's BN and Swish passes around it, what `VAEBM_JAX_FUSED_CELLS=0` runs).

  python experiments/benchmark_dwcell.py                 # one device on both cores
  python experiments/benchmark_dwcell.py --devices=2     # the batch split over two devices, one per core

Times `jax.value_and_grad` with respect to x (a Langevin step's use: forward, then the input gradient)
of a sum of sines of the cell's output, the minimum of `--repeats` calls after a compiling one. Shapes
(global batch, H, W, C): CIFAR-10's decoder cells at Langevin batch 16 and 1, CelebA 64's widest, and two
wide, narrow cells of the size of CelebA-HQ/LSUN decoders. Throughput here depends on memory bandwidth
and caches: a cell alone keeps more of its data in cache than inside a chain (experiments/RESULTS.md).
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 1, "simulated CPU devices the batch is split over")
flags.DEFINE_integer("repeats", 10, "timed calls per measurement")

SHAPES = [(16, 16, 16, 1536), (1, 16, 16, 1536), (4, 64, 64, 192), (1, 256, 256, 48), (2, 128, 128, 96)]


def main(_):
  import jax
  jax.config.update("jax_num_cpu_devices", FLAGS.devices)
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from vaebm_jax.models import depthwise, layers

  if not depthwise.available():
    raise SystemExit("the native kernels could not be built here (see the warning above)")
  mesh = jax.make_mesh((FLAGS.devices,), ("data",))

  def bench(cell, x):
    step = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(cell(x)))))
    jax.block_until_ready(step(x))
    times = []
    for _ in range(FLAGS.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(step(x))
      times.append(time.perf_counter() - t0)
    return min(times) * 1e3

  print(f"{FLAGS.devices} device(s); value and input gradient, ms (min of {FLAGS.repeats})\n")
  print("| shape (B, H, W, C) | unfused | fused | fused / unfused |\n|---|---|---|---|")
  for shape in SHAPES:
    if shape[0] % FLAGS.devices:
      continue
    keys = jax.random.split(jax.random.key(0), 6)
    c = shape[-1]
    x = jax.device_put(jax.random.normal(keys[0], shape), NamedSharding(mesh, PartitionSpec("data")))
    w = 0.2 * jax.random.normal(keys[1], (5, 5, c))
    a1, b1, a2, b2 = (0.5 * jax.random.normal(k, (c,)) for k in keys[2:])
    fused = bench(lambda x: depthwise.native_dwcell(x, w, a1, b1, a2, b2), x)
    unfused = bench(lambda x: layers.swish(a2 * depthwise.native_depthwise_conv(layers.swish(a1 * x + b1), w) + b2), x)
    print(f"| {shape} | {unfused:.2f} | {fused:.2f} | {fused / unfused:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
