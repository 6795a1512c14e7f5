"""Benchmark: ε-space Langevin steps of VAEBM (NVAE decoder + energy net, forward and ε-gradient).

One configuration per process, so that peak RSS is that configuration's own:

  python experiments/benchmark_langevin.py --dataset=cifar10 --batch=4 --steps=4 --unroll=1
  python experiments/benchmark_langevin.py --all          # the table in experiments/RESULTS.md

Times `sampling.langevin_chain` (a jitted lax.scan of `--steps` updates with the reference 'code'
potential) after compilation and reports seconds per Langevin step, images·steps per second, compile
time of the chain and the process's peak RSS. Weights are random (speed does not depend on them). On CPU the
chain is sharded over one simulated device per core, as main.py does.

PyTorch reference on the same 2-core machine: CIFAR-10 0.57 / 1.99 / 10.0 s per step at batch
1 / 4 / 16 (peak RSS 18.1 GB at 16); CelebA 64 1.05 s at batch 4.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

flags.DEFINE_string("dataset", "cifar10", "cifar10 | celeba64")
flags.DEFINE_integer("batch", 4, "chains")
flags.DEFINE_integer("steps", 4, "Langevin steps in the timed chain")
flags.DEFINE_integer("repeats", 2, "timed chains after the compiling one")
flags.DEFINE_string("unroll", "1", "lax.scan unroll: an integer or 'full'")
flags.DEFINE_integer("devices", 0, "CPU devices to simulate (0 = one per core)")
flags.DEFINE_string("conv_impl", "auto", "auto | xla | fast_cpu")
flags.DEFINE_bool("remat", False, "rematerialise decoder cells")
flags.DEFINE_bool("vae_scan_groups", False, "NVAE latent groups as one nn.scan per scale (stage 2 default: no)")
flags.DEFINE_bool("all", False, "run the RESULTS.md table, one subprocess per row")
FLAGS = flags.FLAGS

TABLE = [("cifar10", 1), ("cifar10", 4), ("cifar10", 16), ("celeba64", 4)]


def run_one():
  import jax
  jax.config.update("jax_num_cpu_devices", FLAGS.devices or os.cpu_count())
  import jax.numpy as jnp
  import numpy as np

  from configs import celeba64_ebm, celeba64_vae, cifar10_ebm, cifar10_vae
  from vaebm_jax import parallel, sampling
  from vaebm_jax.models.energy import EnergyNet
  from vaebm_jax.models.nvae import NVAE

  vae_cfg, ebm_cfg = {"cifar10": (cifar10_vae, cifar10_ebm), "celeba64": (celeba64_vae, celeba64_ebm)}[FLAGS.dataset]
  vae_cfg, ebm_cfg = vae_cfg.get_config(), ebm_cfg.get_config()
  vae = NVAE(**dict(vae_cfg.model.to_dict(), conv_impl=FLAGS.conv_impl, remat_cells=FLAGS.remat,
                      scan_groups=FLAGS.vae_scan_groups))
  ebm = EnergyNet(ebm_cfg.ebm.architecture, ebm_cfg.ebm.n_channel, data_init=False, conv_impl=FLAGS.conv_impl)
  size = vae.image_size
  x = jnp.zeros((1, size, size, 3))
  # Random weights of the right shapes without compiling `init` (which takes minutes for the 130.7 M
  # CIFAR-10 NVAE on XLA:CPU): speed does not depend on the values.
  rng = np.random.default_rng(0)
  fill = lambda tree: jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), tree)
  vv = jax.eval_shape(lambda k: vae.init({"params": k, "sample": k}, x, False), jax.random.key(0))
  ev = jax.eval_shape(lambda k: ebm.init(k, x), jax.random.key(1))
  stats = jax.tree_util.tree_map_with_path(
      lambda path, s: np.ones(s.shape, np.float32) if "var" in jax.tree_util.keystr(path) else
      np.zeros(s.shape, np.float32), vv["batch_stats"])
  params = {"vae": {"params": fill(vv["params"]), "batch_stats": stats}, "ebm": {"params": fill(ev["params"])}}
  mesh = parallel.create_mesh()
  params = jax.device_put(params, parallel.replicated(mesh))
  unroll = True if FLAGS.unroll == "full" else int(FLAGS.unroll)

  def chain(key, params):
    eps = sampling.initial_noise(key, vae, FLAGS.batch, mesh)
    potential = lambda e: sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm, potential="code")
    final, energies, _ = sampling.langevin_chain(eps, key, potential, num_steps=FLAGS.steps,
                                                 step_size=ebm_cfg.langevin.step_size, unroll=unroll)
    return final, energies

  jitted = jax.jit(chain)
  t0 = time.perf_counter()
  compiled = jitted.lower(jax.random.key(2), params).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(jax.random.key(3), params))
  times = []
  for r in range(FLAGS.repeats):
    t0 = time.perf_counter()
    _, energies = compiled(jax.random.key(4 + r), params)
    jax.block_until_ready(energies)
    times.append(time.perf_counter() - t0)
  per_step = min(times) / FLAGS.steps
  print(json.dumps({
      "dataset": FLAGS.dataset, "batch": FLAGS.batch, "devices": mesh.size, "unroll": FLAGS.unroll,
      "conv_impl": FLAGS.conv_impl, "remat": FLAGS.remat,
      "vae_scan_groups": FLAGS.vae_scan_groups, "steps_per_chain": FLAGS.steps,
      "s_per_step": round(per_step, 4), "images_steps_per_s": round(FLAGS.batch / per_step, 3),
      "compile_s": round(compile_s, 1),
      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
      "nvae_params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params["vae"]["params"]))),
      "energies_finite": bool(np.isfinite(np.asarray(energies)).all()),
  }), flush=True)


def main(_):
  if not FLAGS.all:
    run_one()
    return
  for dataset, batch in TABLE:
    for unroll in ("1", "full"):
      cmd = [sys.executable, __file__, f"--dataset={dataset}", f"--batch={batch}", f"--steps={FLAGS.steps}",
             f"--unroll={unroll}", f"--repeats={FLAGS.repeats}", f"--conv_impl={FLAGS.conv_impl}"]
      out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
      lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
      print(lines[-1] if lines else f"FAILED {' '.join(cmd)}: {out.stderr[-500:]}", flush=True)


if __name__ == "__main__":
  app.run(main)
