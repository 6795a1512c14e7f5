"""Benchmark: one NVAE training step of a config (default CIFAR-10, 130.7 M parameters) at batch 4.

Times the full jitted `train_step` (forward, backward, spectral regulariser, Adamax update) on
random images, after compilation, over all local devices (one simulated device per core on CPU).

  python experiments/benchmark_vae_step.py --config=configs/cifar10_vae.py --batch=4 --repeats=5
  python experiments/benchmark_vae_step.py --devices=1           # one XLA device using both cores
  python experiments/benchmark_vae_step.py --conv_impl=xla       # XLA's own convolutions throughout

The state is created by the jitted `create_train_state` as in training (its compile time is
`init_s`). The PyTorch reference took 12.3 s (median) for this step on the same 2-core machine.
"""

import functools
import json
import os
import resource
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("config", "configs/cifar10_vae.py", "stage-1 config file")
flags.DEFINE_integer("batch", 4, "global batch size")
flags.DEFINE_integer("repeats", 5, "timed steps after the first (compiling) one")
flags.DEFINE_integer("devices", 0, "CPU devices to simulate (0 = one per core)")
flags.DEFINE_string("conv_impl", "auto", "auto | xla | fast_cpu")
FLAGS = flags.FLAGS


def main(_):
  import jax
  jax.config.update("jax_num_cpu_devices", FLAGS.devices or os.cpu_count())
  import importlib.util

  import numpy as np

  from vaebm_jax import objectives, parallel, train_vae

  spec = importlib.util.spec_from_file_location("cfg", FLAGS.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.conv_impl = FLAGS.conv_impl
  config.train.batch_size = FLAGS.batch

  mesh = parallel.create_mesh()
  parallel.check_batch_size(FLAGS.batch, mesh)
  model = train_vae.create_model(config)
  tx, schedule = train_vae.create_optimizer(config, steps_per_epoch=195, epochs=config.train.epochs)
  repl, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  shape = (config.model.image_size, config.model.image_size, config.model.image_channels)
  t0 = time.perf_counter()
  state = jax.jit(functools.partial(train_vae.create_train_state, model, tx, image_shape=shape),
                  out_shardings=repl)(jax.random.key(0))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  step = jax.jit(functools.partial(train_vae.train_step, model=model, tx=tx, schedule=schedule,
                                   settings=train_vae.StepSettings.of(config), total_steps=config.train.epochs * 195,
                                   alpha=objectives.kl_balancer_coefficients(model.groups)),
                 in_shardings=(repl, sharded, repl), out_shardings=(repl, repl), donate_argnums=0)
  batch = parallel.shard_batch(np.random.default_rng(0).uniform(size=(FLAGS.batch,) + shape).astype(np.float32),
                               mesh)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  result = {
      "config": FLAGS.config, "batch": FLAGS.batch, "devices": mesh.size, "conv_impl": FLAGS.conv_impl,
      "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params))),
      "step_median_s": statistics.median(times), "step_min_s": min(times), "steps_timed": len(times),
      "first_step_incl_compile_s": first_s, "init_s": init_s,
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
      "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
  }
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
