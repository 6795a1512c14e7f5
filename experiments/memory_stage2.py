"""Device memory of each paper config's stage-2 training step, from the compiled program.

  python experiments/memory_stage2.py                 # all four paper configs, one process each
  python experiments/memory_stage2.py --config=cifar10

For each config the stage-2 train step (K Langevin steps through the frozen NVAE, positive and negative
energies, spectral regulariser, Adam) is lowered for ONE device at the reference's per-GPU batch (32 on
the single V100 of CIFAR-10 / CelebA 64 / LSUN; 4 per GPU on CelebA-HQ 256's four), with the replay
buffer that device holds (`buffer.capacity` per device, as the reference's per-process buffer), from
abstract shapes only (nothing is allocated or run), then compiled by XLA:CPU; `memory_analysis()` gives
the sizes of the program's arguments, outputs (aliased with the donated state) and temporaries.
XLA:GPU's buffer assignment differs in detail (fusion, cuDNN workspaces), so these are estimates of the
order of what a GPU needs; the state sizes are exact. Writes experiments/results/memory_stage2.json.
"""

import functools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

CONFIGS = {   # name: (per-device batch, the reference's hardware)
    "cifar10": (32, "1 × V100 32 GB"),
    "celeba64": (32, "1 × V100 32 GB"),
    "lsun_church64": (32, "1 × V100 32 GB"),
    "celebahq256": (4, "4 × V100 32 GB (4 images and one 2,000-entry buffer per GPU)"),
}
flags.DEFINE_string("config", None, "one of CONFIGS; default: all, each in its own process")
flags.DEFINE_string("out", common.RESULTS, "where memory_stage2.json goes")
flags.DEFINE_bool("remat", None, "rematerialise the NVAE's cells in the Langevin gradient (model.remat_cells); "
                  "default: the config's vae_remat_cells")
FLAGS = flags.FLAGS


def measure(name: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from vaebm_jax import parallel, train_ebm, workdir

  vae_config, config = common.stage_configs(name)
  batch, hardware = CONFIGS[name]
  if FLAGS.remat is not None:
    config.vae_remat_cells = FLAGS.remat
  remat = bool(config.get("vae_remat_cells", False))
  vae = workdir.stage2_vae(workdir.create_vae(vae_config).clone(scan_groups=False), config)   # as stage 2 loads it
  ebm = workdir.create_ebm(config, data_init=False)
  tx = train_ebm.create_optimizer(config)
  mesh = parallel.create_mesh(jax.devices()[:1])
  x = jax.ShapeDtypeStruct((batch,) + vae.image_shape, jnp.float32)
  vae_variables = jax.eval_shape(lambda k: vae.init({"params": k, "sample": k}, jnp.zeros(x.shape), False),
                                 jax.random.key(0))
  vae_variables = {k: vae_variables[k] for k in ("params", "batch_stats")}
  capacity = config.buffer.capacity if config.buffer.use else 0
  state = jax.eval_shape(functools.partial(train_ebm.create_train_state, ebm, vae, tx, buffer_capacity=capacity,
                                           buffer_shards=1), jax.random.key(1), jnp.zeros(x.shape))
  step = jax.jit(lambda s, b, k, vv: train_ebm.train_step(s, b, k, vae=vae, vae_variables=vv, ebm=ebm, tx=tx,
                                                          settings=train_ebm.StepSettings.of(config), mesh=mesh),
                 donate_argnums=0, compiler_options=parallel.compiler_options_for(vae))
  t0 = time.time()
  compiled = step.lower(state, x, jax.random.key(2), vae_variables).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  size = lambda tree: int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree)))
  gb = lambda b: round(b / 2 ** 30, 3)
  args, out, temp, alias = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes,
                            mem.alias_size_in_bytes)
  return {
      "config": name, "per_device_batch": batch, "langevin_train_steps": config.langevin.train_steps,
      "buffer_entries_per_device": capacity, "reference_hardware": hardware, "vae_remat_cells": remat,
      "state_gib": {"nvae_params_and_bn": gb(size(vae_variables)), "ebm_params": gb(size(state.params)),
                    "optimizer": gb(size(state.opt_state)), "replay_buffer": gb(size(state.buffer))},
      "compiled_gib": {"arguments": gb(args), "outputs": gb(out), "aliased": gb(alias), "temporaries": gb(temp),
                       "peak_estimate": gb(args + out - alias + temp)},
      "compile_s": round(compile_s, 1),
  }


def main(_):
  if FLAGS.config:
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    print("RESULT " + json.dumps(measure(FLAGS.config)), flush=True)
    return
  results = []
  remat = [] if FLAGS.remat is None else [f"--remat={FLAGS.remat}"]
  for name in CONFIGS:
    proc = subprocess.run([sys.executable, __file__, f"--config={name}"] + remat, capture_output=True, text=True,
                          cwd=common.ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
      print(proc.stderr[-3000:])
      results.append({"config": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
      continue
    results.append(json.loads(line[len("RESULT "):]))
    print(results[-1], flush=True)
  common.write_result("memory_stage2", FLAGS.out, {"rows": results, "host": common.host()})


if __name__ == "__main__":
  app.run(main)
