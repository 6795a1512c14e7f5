"""Float32 precision of the ε-space sampler on whatever backend JAX runs (meant for GPUs and TPUs).

  python experiments/gpu_precision.py [--golden=../shared/reference/vaebm_small_golden.npz] [--steps=20]

XLA on recent GPUs (TF32) and TPUs (bf16 passes) runs float32 convolutions and matmuls at reduced
precision unless asked otherwise; `sampling.PRECISION` pins the potential and its gradient to float32.
For each matmul precision in `--precisions` this script sets `sampling.PRECISION` and reports, on the
golden model of `../shared/reference` (the official code's outputs):
- the relative error ‖ours − official‖/‖official‖ of U, E and ∂U/∂ε (one evaluation), and
- the relative difference of a `--steps`-step Langevin chain's displacement ε_K − ε₀ and final U from
  the same chain run on the CPU in float32 (same ε₀, same noise: threefry draws the same bits on every
  backend).
Prints a Markdown table; `--out` writes the figures as JSON.
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
flags.DEFINE_string("golden", os.path.join(ROOT, "..", "shared", "reference", "vaebm_small_golden.npz"),
                    "reference file")
flags.DEFINE_integer("steps", 20, "Langevin steps of the chain compared with the CPU's")
flags.DEFINE_float("step_size", 8e-5, "Langevin step size (CIFAR-10's)")
flags.DEFINE_list("precisions", ["float32", "tensorfloat32", "bfloat16"], "values of sampling.PRECISION to try")
flags.DEFINE_string("out", None, "JSON written at the end")
FLAGS = flags.FLAGS


def rel(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(_):
  import jax
  import jax.numpy as jnp

  from tests.helpers import golden_variables, nchw_to_nhwc
  from vaebm_jax import sampling
  from vaebm_jax.models.energy import EnergyNet

  d = np.load(FLAGS.golden)
  base, vv, ev = golden_variables(d)
  model = base.clone(conv_impl="xla")
  ebm = EnergyNet("cifar10", int(d["meta/ebm_channels"]), data_init=False, conv_impl="xla")
  eps = ([nchw_to_nhwc(d[f"in/eps_z/{i}"]) for i in range(model.num_groups)], nchw_to_nhwc(d["in/eps_x"]))
  official_grad = np.concatenate([np.ravel(nchw_to_nhwc(d[f"out/dU_deps_z/{i}"])) for i in range(model.num_groups)]
                                 + [np.ravel(nchw_to_nhwc(d["out/dU_deps_x"]))])
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])

  def functions(precision):
    """Fresh functions per precision: `sampling.PRECISION` is read when jit traces, and jit caches its trace
    per function, so reusing one function would keep the first precision's program."""
    sampling.PRECISION = precision

    def evaluate(params, e):
      potential = lambda e: sampling.potential_fn(e[0], e[1], params, vae=model, ebm=ebm)
      summed = lambda e: (jnp.sum(potential(e)[0]), potential(e))
      with jax.default_matmul_precision(precision):
        grads, (u, energy) = jax.grad(summed, has_aux=True)(e)
      return u, energy, grads

    def chain(params, e, key):
      potential = lambda e: sampling.potential_fn(e[0], e[1], params, vae=model, ebm=ebm)
      final, energies, _ = sampling.langevin_chain(e, key, potential, num_steps=FLAGS.steps,
                                                   step_size=FLAGS.step_size)
      return final, energies[-1]

    return jax.jit(evaluate), jax.jit(chain)

  accel = jax.devices()[0]
  cpu = jax.devices("cpu")[0]
  params = {"vae": vv, "ebm": ev}
  key = jax.random.key(0)
  with jax.default_device(cpu):                         # the float32 CPU baseline of the chain
    cpu_final, cpu_u = functions("float32")[1](params, eps, key)
  results = {"device": accel.device_kind, "platform": accel.platform, "jax": jax.__version__, "steps": FLAGS.steps,
             "rows": {}}
  for precision in FLAGS.precisions:
    t0 = time.perf_counter()
    evaluate, chain = functions(precision)
    ops = [line for line in evaluate.lower(params, eps).as_text().splitlines()
           if "stablehlo.convolution" in line or "stablehlo.dot_general" in line]
    u, energy, grads = evaluate(params, eps)
    final, u_last = chain(params, eps, key)
    row = {"U_vs_official": rel(u, d["out/U"]), "E_vs_official": rel(energy, d["out/energy"]),
           "dU_deps_vs_official": rel(flat(grads), official_grad),
           "chain_eps_vs_cpu": rel(flat(final) - flat(eps), flat(cpu_final) - flat(eps)),
           "chain_U_vs_cpu": rel(u_last, cpu_u),
           "finite": bool(np.all(np.isfinite(flat(final)))), "wall_s": time.perf_counter() - t0,
           # what the program asks of XLA: convolutions and dots at HIGHEST (float32) precision, of all
           "highest_ops": sum("HIGHEST" in line for line in ops),
           "conv_and_dot_ops": len(ops)}
    results["rows"][precision] = row
    print(json.dumps({precision: row}), flush=True)
  sampling.PRECISION = "float32"
  lines = [f"Device: {accel.device_kind} ({accel.platform}), jax {jax.__version__}; chain of {FLAGS.steps} steps, "
           f"step size {FLAGS.step_size:g}.", "",
           "| sampling.PRECISION | U vs official | E vs official | ∂U/∂ε vs official | chain ε_K − ε₀ vs CPU | "
           "chain U vs CPU | ops at HIGHEST |", "|---|---|---|---|---|---|---|"]
  for precision, r in results["rows"].items():
    lines.append(f"| {precision} | {r['U_vs_official']:.1e} | {r['E_vs_official']:.1e} | "
                 f"{r['dU_deps_vs_official']:.1e} | {r['chain_eps_vs_cpu']:.1e} | {r['chain_U_vs_cpu']:.1e} | "
                 f"{r['highest_ops']} / {r['conv_and_dot_ops']} |")
  print("\n".join(lines))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
