"""One process of tests/test_multihost.py: a training step of stage 1 and of stage 2 (the 2-D smoke
configs: MLP VAE, MLP energy with ε-space chains and a replay buffer) on the global batch, run as one
of `--num_processes` JAX processes (CPU collectives through gloo), each with `--local_devices` devices.

Writes `<out>/process_<i>.npz`: this process's share of the data, and the parameters, optimiser state,
buffer and metrics after one step of each stage (all replicated but the buffer, gathered to every process).
"""

import argparse
import functools
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--local_devices", type=int, default=2)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.local_devices)
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=120)

  import numpy as np
  from jax.experimental import multihost_utils

  from configs import gaussians25_ebm, gaussians25_vae
  from vaebm_jax import data, objectives, parallel, train_ebm, train_vae, workdir

  mesh = parallel.create_mesh()
  repl = parallel.replicated(mesh)
  pid, count = jax.process_index(), jax.process_count()
  out = {}

  def gather(tree, prefix):
    for path, leaf in jax.tree.leaves_with_path(tree):
      leaf = multihost_utils.process_allgather(leaf, tiled=True) if not leaf.is_fully_replicated else leaf
      out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)

  # ---- stage 1: one NVAE-loop step of the MLP VAE
  config = gaussians25_vae.get_config("smoke")
  ds = data.create_dataset(config.data.name, "train", global_batch_size=config.train.batch_size, seed=0, train=True,
                           process_index=pid, process_count=count)
  local = ds.batches[0]
  out["stage1/local_batch"] = local
  model = workdir.create_vae(config)
  tx, schedule = train_vae.create_optimizer(config, ds.steps_per_epoch, 1)
  init = functools.partial(train_vae.create_train_state, model, tx, image_shape=ds.image_shape)
  state = jax.jit(init, out_shardings=repl)(jax.random.key(0))
  step = jax.jit(functools.partial(train_vae.train_step, model=model, tx=tx, schedule=schedule,
                                   settings=train_vae.StepSettings.of(config), total_steps=100,
                                   alpha=objectives.kl_balancer_coefficients(model.groups)),
                 out_shardings=(repl, repl))
  vae_state, metrics = step(state, parallel.shard_batch(local, mesh), jax.random.key(1))
  gather(vae_state.params, "stage1/params")
  gather(vae_state.opt_state, "stage1/opt_state")
  gather(metrics, "stage1/metrics")

  # ---- stage 2: one EBM step on that VAE, ε-space chains, replay buffer sharded over all devices
  config = gaussians25_ebm.get_config("smoke")
  config.buffer.update(use=True, capacity=8, anneal_steps=1)
  vae_variables = {"params": vae_state.params}
  ebm = workdir.create_ebm(config)
  tx = train_ebm.create_optimizer(config)
  ds = data.create_dataset(config.data.name, "train", global_batch_size=config.train.batch_size, seed=0, train=True,
                           process_index=pid, process_count=count)
  out["stage2/local_batch"] = ds.batches[0]
  init = functools.partial(train_ebm.create_train_state, ebm, model, tx, buffer_capacity=8, buffer_shards=mesh.size)
  shapes = jax.eval_shape(init, jax.random.key(2), parallel.shard_batch(ds.batches[0], mesh))
  shardings = train_ebm.state_shardings(shapes, mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(2), parallel.shard_batch(ds.batches[0], mesh))
  step = jax.jit(lambda s, b, k: train_ebm.train_step(s, b, k, vae=model, vae_variables=vae_variables, ebm=ebm, tx=tx,
                                                      settings=train_ebm.StepSettings.of(config), mesh=mesh),
                 out_shardings=(shardings, repl))
  for i in range(2):   # the second step replays from the buffer
    state, metrics = step(state, parallel.shard_batch(ds.batches[i], mesh), jax.random.key(3))
  gather(state.params, "stage2/params")
  gather(state.buffer, "stage2/buffer")
  gather(metrics, "stage2/metrics")
  np.savez(os.path.join(args.out, f"process_{pid}.npz"), **out)


if __name__ == "__main__":
  main()
