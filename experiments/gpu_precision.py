"""Float32 precision of the ε-space sampler on whatever backend JAX runs (meant for GPUs and TPUs).

  python experiments/gpu_precision.py [--golden=../shared/reference/vaebm_small_golden.npz] [--steps=20]

XLA on recent GPUs (TF32) and TPUs (bf16 passes) runs float32 convolutions and matmuls at reduced
precision unless asked otherwise; `sampling.PRECISION` pins the potential and its gradient to float32.
For each mode in `--modes` — a matmul precision for `sampling.PRECISION` (float32, tensorfloat32,
bfloat16), or float32 with bf16 operands in the convolutions of both networks (`bf16_networks`), of the
NVAE only (`bf16_vae`) or of the energy network only (`bf16_ebm`; models.layers.lowp_conv) — it reports,
on the golden model of `../shared/reference` (the official code's outputs):
- the relative error ‖ours − official‖/‖official‖ of U, E and ∂U/∂ε (one evaluation), and
- the relative difference of a `--steps`-step Langevin chain's displacement ε_K − ε₀ and final U from
  the same chain run on the CPU in float32 (same ε₀, same noise: threefry draws the same bits on every
  backend), and of its final decoded images (the decoder mean) from the CPU's, relative to how far the
  CPU chain moved them from its start;
- the error of ∂U/∂ε as a Langevin step sees it, ‖(η/2)·Δ∇U‖ against the step's noise √η·ξ;
- the gradient of stage 2's contrastive loss w.r.t. the energy network against float32's on the same device;
- how many of the compiled program's convolutions read bf16 operands (XLA may keep some in float32).
On the CPU itself the modes of matmul precision all run float32 (XLA:CPU has no faster path), while the
bf16 modes round every operand to bf16 and accumulate in float32: `tests/test_sampling.py` holds their
tolerance.
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
flags.DEFINE_list("modes", ["float32", "tensorfloat32", "bfloat16", "bf16_networks", "bf16_vae", "bf16_ebm"],
                  "values of sampling.PRECISION, or float32 with bf16 convolutions (bf16_networks/_vae/_ebm)")
flags.DEFINE_string("pretrained", "stacked_digits", "also compare sample_fn's images with bf16 networks against "
                    "float32 on this bundled trained model (vaebm_jax/pretrained; '' to skip)")
flags.DEFINE_string("out", None, "JSON written at the end")
FLAGS = flags.FLAGS


def rel(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compiled_convolutions(hlo: str) -> dict:
  """Counts the convolutions of an optimised HLO module (`convolution(` or a cuDNN convolution custom call)
  and those whose operands are bf16."""
  is_conv = lambda line: " convolution(" in line or (
      "custom-call(" in line and "conv" in line.split("custom_call_target=")[-1][:40])
  convs = [line for line in hlo.splitlines() if is_conv(line)]
  operands = [line.split("convolution(" if " convolution(" in line else "custom-call(", 1)[1].split(")", 1)[0]
              for line in convs]
  return {"compiled_convs": len(convs), "compiled_bf16_convs": sum("bf16[" in o for o in operands)}


def pretrained_images(name: str, num_samples: int = 16) -> dict:
  """`sample_fn`'s images with bf16 networks against float32's, same key, on a bundled trained model: after
  0 Langevin steps (the decoder alone) and after the model's own number of steps; in 8-bit grey levels."""
  import functools

  import jax

  from vaebm_jax import load_vaebm, sample_fn, sampling, workdir
  vae, ebm, params, settings = load_vaebm(workdir.pretrained(name))
  out = {"model": name, "num_samples": num_samples}
  for steps in (0, settings["num_steps"]):
    images = {}
    for dtype in ("float32", "bfloat16"):
      draw = functools.partial(sample_fn, vae=vae.clone(conv_dtype=dtype), ebm=ebm.clone(conv_dtype=dtype),
                               num_samples=num_samples, **dict(settings, num_steps=steps))
      images[dtype] = np.asarray(jax.jit(draw)(jax.random.key(0), params))
    diff = 255 * np.abs(images["bfloat16"] - images["float32"])
    out[f"steps_{steps}"] = {"max_8bit": float(diff.max()), "mean_8bit": float(diff.mean())}
  # what sample_fn's float32 final decode avoids: the decoder mean of the same ε with bf16 convolutions
  decode = lambda dtype: np.clip(np.asarray(jax.jit(functools.partial(
      sampling.vae_samples, vae=vae.clone(conv_dtype=dtype), num_samples=num_samples))(
          jax.random.key(0), params["vae"])), 0, 1)
  diff = 255 * np.abs(decode("bfloat16") - decode("float32"))
  out["bf16_decoder_alone"] = {"max_8bit": float(diff.max()), "mean_8bit": float(diff.mean())}
  return out


# mode → (sampling.PRECISION, the NVAE's conv_dtype, the energy network's conv_dtype)
BF16_MODES = {"bf16_networks": ("bfloat16", "bfloat16"), "bf16_vae": ("bfloat16", "float32"),
              "bf16_ebm": ("float32", "bfloat16")}


def mode_settings(mode: str) -> tuple[str, str, str]:
  if mode in BF16_MODES:
    return ("float32",) + BF16_MODES[mode]
  return mode, "float32", "float32"


def main(_):
  import jax
  import jax.numpy as jnp

  from tests.helpers import golden_variables, nchw_to_nhwc
  from vaebm_jax import sampling
  from vaebm_jax.models.energy import EnergyNet

  d = np.load(FLAGS.golden)
  base, vv, ev = golden_variables(d)
  eps = ([nchw_to_nhwc(d[f"in/eps_z/{i}"]) for i in range(base.num_groups)], nchw_to_nhwc(d["in/eps_x"]))
  official_grad = np.concatenate([np.ravel(nchw_to_nhwc(d[f"out/dU_deps_z/{i}"])) for i in range(base.num_groups)]
                                 + [np.ravel(nchw_to_nhwc(d["out/dU_deps_x"]))])
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])

  def functions(mode):
    """Fresh functions per mode: `sampling.PRECISION` is read when jit traces, and jit caches its trace
    per function, so reusing one function would keep the first precision's program."""
    precision, vae_dtype, ebm_dtype = mode_settings(mode)
    sampling.PRECISION = precision
    model = base.clone(conv_impl="xla", conv_dtype=vae_dtype)
    ebm = EnergyNet("cifar10", int(d["meta/ebm_channels"]), data_init=False, conv_impl="xla", conv_dtype=ebm_dtype)

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
      with jax.default_matmul_precision(precision):
        images = model.decode_from_eps(params["vae"], final[0], final[1])["mean"]
      return final, energies[-1], images

    def cd_grad(ebm_params, x_pos, x_neg):
      """∂/∂ψ of the contrastive loss mean E(x⁺) − mean E(x⁻) (stage 2's, without its regulariser)."""
      loss = lambda p: jnp.mean(ebm.apply(p, x_pos)) - jnp.mean(ebm.apply(p, x_neg))
      with jax.default_matmul_precision(precision):
        return jax.grad(loss)(ebm_params)

    return jax.jit(evaluate), jax.jit(chain), jax.jit(cd_grad)

  accel = jax.devices()[0]
  cpu = jax.devices("cpu")[0]
  params = {"vae": vv, "ebm": ev}
  key = jax.random.key(0)
  with jax.default_device(cpu):                         # the float32 CPU baseline of the chain
    cpu_final, cpu_u, cpu_images = functions("float32")[1](params, eps, key)
    start_images = base.clone(conv_impl="xla").decode_from_eps(vv, eps[0], eps[1])["mean"]
  x_pos = nchw_to_nhwc(d["in/x_data"])
  x_neg = jnp.clip(x_pos + 0.1 * jax.random.normal(jax.random.key(1), x_pos.shape), 0.0, 1.0)
  cd_reference = flat(functions("float32")[2](ev, x_pos, x_neg))   # float32 on this device, whatever --modes
  results = {"device": accel.device_kind, "platform": accel.platform, "jax": jax.__version__, "steps": FLAGS.steps,
             "rows": {}}
  for mode in FLAGS.modes:
    t0 = time.perf_counter()
    evaluate, chain, cd_grad = functions(mode)
    lowered = evaluate.lower(params, eps)
    ops = [line for line in lowered.as_text().splitlines()
           if "stablehlo.convolution" in line or "stablehlo.dot_general" in line]
    compiled = lowered.compile()
    u, energy, grads = compiled(params, eps)
    final, u_last, images = chain(params, eps, key)
    cd = flat(cd_grad(ev, x_pos, x_neg))
    row = {"U_vs_official": rel(u, d["out/U"]), "E_vs_official": rel(energy, d["out/energy"]),
           "dU_deps_vs_official": rel(flat(grads), official_grad),
           # the gradient's error as a Langevin step sees it: ‖(η/2)·Δ∇U‖ against the step's noise √η·ξ
           # (‖ξ‖ ≈ √n): far below 1, the chain's law is that of float32's
           "drift_error_vs_noise": float(0.5 * np.sqrt(FLAGS.step_size) * np.linalg.norm(flat(grads) - official_grad)
                                         / np.sqrt(official_grad.size)),
           "chain_eps_vs_cpu": rel(flat(final) - flat(eps), flat(cpu_final) - flat(eps)),
           "chain_U_vs_cpu": rel(u_last, cpu_u),
           "chain_images_vs_cpu": rel(flat(images) - flat(start_images), flat(cpu_images) - flat(start_images)),
           "images_max_abs_diff_8bit": float(255 * np.max(np.abs(flat(images) - flat(cpu_images)))),
           # stage 2's training signal: the contrastive loss's gradient w.r.t. the energy network's weights
           # (golden images against noised copies), against float32's on this device
           "cd_grad_vs_float32": rel(cd, cd_reference),
           "finite": bool(np.all(np.isfinite(flat(final)))), "wall_s": time.perf_counter() - t0,
           # what the program asks of XLA: convolutions and dots at HIGHEST (float32) precision, and with
           # bf16 operands, of all
           "highest_ops": sum("HIGHEST" in line for line in ops),
           "bf16_ops": sum("xbf16>" in line.rsplit("->", 1)[0] for line in ops),
           "conv_and_dot_ops": len(ops),
           # what the backend compiled: its convolutions (XLA:GPU's cuDNN calls), and of those, how many
           # read bf16 operands (XLA may drop a float32→bf16→float32 round trip and convolve in float32)
           **compiled_convolutions(compiled.as_text())}
    results["rows"][mode] = row
    print(json.dumps({mode: row}), flush=True)
  sampling.PRECISION = "float32"
  if FLAGS.pretrained:
    results["pretrained"] = pretrained_images(FLAGS.pretrained)
    print(json.dumps({"pretrained": results["pretrained"]}), flush=True)
  lines = [f"Device: {accel.device_kind} ({accel.platform}), jax {jax.__version__}; chain of {FLAGS.steps} steps, "
           f"step size {FLAGS.step_size:g}.", "",
           "| mode | U vs official | E vs official | ∂U/∂ε vs official | (η/2)Δ∇U / noise | chain ε_K − ε₀ vs CPU | "
           "chain U vs CPU | chain images vs CPU | max image diff (1/255) | CD ∂/∂ψ vs float32 | ops at HIGHEST | "
           "bf16 ops | compiled convs with bf16 operands |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for mode, r in results["rows"].items():
    lines.append(f"| {mode} | {r['U_vs_official']:.1e} | {r['E_vs_official']:.1e} | "
                 f"{r['dU_deps_vs_official']:.1e} | {r['drift_error_vs_noise']:.1e} | {r['chain_eps_vs_cpu']:.1e} | "
                 f"{r['chain_U_vs_cpu']:.1e} | {r['chain_images_vs_cpu']:.1e} | {r['images_max_abs_diff_8bit']:.2f} | "
                 f"{r['cd_grad_vs_float32']:.1e} | "
                 f"{r['highest_ops']} / {r['conv_and_dot_ops']} | "
                 f"{r['bf16_ops']} | {r['compiled_bf16_convs']} / {r['compiled_convs']} |")
  if FLAGS.pretrained:
    p = results["pretrained"]
    lines += ["", f"sample_fn on the bundled {p['model']} model, bf16 networks against float32 (same key, "
              f"{p['num_samples']} samples, images decoded in float32): "
              + "; ".join(f"{k.replace('_', ' ')}: max {v['max_8bit']:.2f}, mean {v['mean_8bit']:.3f} grey levels"
                          for k, v in p.items() if isinstance(v, dict))]
  print("\n".join(lines))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
