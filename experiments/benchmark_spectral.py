"""Micro-benchmark: the spectral regulariser of the CIFAR-10 NVAE step, alone.

  python experiments/benchmark_spectral.py

Times `jit(value_and_grad)` of `objectives.spectral_norm_penalty` (4 power iterations, the gradient
with respect to every conv kernel) on random kernels of the CIFAR-10 NVAE's shapes (46 sown kernel
stacks, 0.52 GB), one device. It prints the penalty too, so that two versions of `objectives.py` can be
compared on the same inputs (run it from a worktree of the other commit with `PYTHONPATH=<worktree>`).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from vaebm_jax import objectives, train_vae  # noqa: E402


def main():
  config, _ = common.stage_configs("cifar10")
  model = train_vae.create_model(config)
  x = jnp.zeros((1,) + tuple(model.image_shape))
  shapes = jax.eval_shape(lambda k: model.init({"params": k, "sample": k}, x, True), jax.random.key(0))
  rng = np.random.default_rng(0)
  kernels = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32) * 0.05),
                         shapes["normalized_weights"])
  state = jax.jit(objectives.init_spectral_state)(jax.random.key(1), kernels)

  def step(kernels, state):
    return jax.value_and_grad(lambda k: objectives.spectral_norm_penalty(k, state, 4), has_aux=True)(kernels)

  compiled = jax.jit(step).lower(kernels, state).compile()
  (penalty, _), _ = jax.block_until_ready(compiled(kernels, state))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(kernels, state))
    times.append(time.perf_counter() - t0)
  size = sum(k.size for k in jax.tree.leaves(kernels)) * 4 / 1e9
  print(f"{len(jax.tree.leaves(kernels))} kernel stacks, {size:.2f} GB; penalty {float(penalty):.4f}; "
        f"s per penalty+gradient: min {min(times):.3f}, median {sorted(times)[2]:.3f}")


if __name__ == "__main__":
  main()
