"""Micro-benchmark: the NVAE's optimiser step under the finite-update guard, as `train_vae.train_step` runs it
(`loop.update_if_finite`: a `lax.cond`) against a select of old and new state (`loop.keep_if_finite` on the
updated parameters and moments, what the step did before).

  python experiments/benchmark_optimizer.py [--dataset=cifar10] [--repeats=5]

Jits the guard, NVAE's Adamax with coupled weight decay and the parameter update over the parameters of
`--dataset`'s NVAE (random values), with the state donated as in training, and prints the minimum and median
seconds per step of each, and how many copies of parameter-sized arrays XLA put into each program.
"""

import os
import re
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("dataset", "cifar10", "whose NVAE's parameters (experiments/common.py stage configs)")
flags.DEFINE_integer("repeats", 5, "timed steps after the compiling one")
FLAGS = flags.FLAGS


def main(_):
  import functools

  import jax
  import jax.numpy as jnp
  import optax

  from experiments import common
  from vaebm_jax import loop, train_vae

  config, _ = common.stage_configs(FLAGS.dataset)
  model = train_vae.create_model(config)
  tx, _ = train_vae.create_optimizer(config, steps_per_epoch=195, epochs=max(config.train.epochs, 1))
  init = functools.partial(train_vae.create_train_state, model, tx, image_shape=tuple(model.image_shape))
  shapes = jax.eval_shape(init, jax.random.key(0))
  fill = lambda s, v: jnp.full(s.shape, v, s.dtype) if s.ndim else jnp.zeros(s.shape, s.dtype)
  params = jax.tree.map(lambda s: fill(s, 0.01), shapes.params)
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  big = {f"f32[{','.join(map(str, p.shape))}]" for p in jax.tree.leaves(params) if p.size >= 1 << 20}
  print(f"{FLAGS.dataset} NVAE: {sum(p.size for p in jax.tree.leaves(params)) / 1e6:.1f} M parameters")

  def cond(params, opt_state, grads):
    finite = jnp.isfinite(optax.tree.norm(grads))
    return loop.update_if_finite(finite, tx, grads, params, opt_state)

  def select(params, opt_state, grads):
    finite = jnp.isfinite(optax.tree.norm(grads))
    updates, new_opt_state = tx.update(grads, opt_state, params)
    keep = lambda new, old: loop.keep_if_finite(finite, new, old)
    return keep(optax.apply_updates(params, updates), params), keep(new_opt_state, opt_state)

  for name, fn in (("lax.cond (loop.update_if_finite)", cond), ("select of old and new", select)):
    state = (jax.tree.map(jnp.copy, params), jax.tree.map(lambda s: fill(s, 0.01), shapes.opt_state))
    step = jax.jit(fn, donate_argnums=(0, 1))
    hlo = step.lower(*state, grads).compile().as_text()
    copies = sum(1 for line in hlo.splitlines() if re.search(r" copy\(", line) and any(b in line for b in big))
    state = step(*state, grads)
    jax.block_until_ready(state)
    times = []
    for _ in range(FLAGS.repeats):
      t0 = time.perf_counter()
      state = step(*state, grads)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
    print(f"{name}: min {min(times):.3f} s, median {statistics.median(times):.3f} s per step; "
          f"{copies} copies of arrays of >= 1 M parameters")


if __name__ == "__main__":
  app.run(main)
