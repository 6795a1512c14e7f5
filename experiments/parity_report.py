"""Parity with the official implementation: max |ours − theirs| for every recorded output.

  python experiments/parity_report.py [--golden=../shared/reference/vaebm_small_golden.npz]

Maps the official PyTorch weights into our modules, runs the ELBO path (BN eval and train), the
sampling path, the energy network and the Langevin potential with its ε-gradient on the recorded
inputs, and prints a Markdown table (one row per output, both conv implementations).
"""

import os
import sys

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
flags.DEFINE_string("golden", os.path.join(ROOT, "..", "shared", "reference", "vaebm_small_golden.npz"),
                    "reference file")
FLAGS = flags.FLAGS


def main(_):
  import jax
  import jax.numpy as jnp

  from tests.helpers import golden_variables, nchw_to_nhwc
  from vaebm_jax import sampling
  from vaebm_jax.models import distributions, nvae
  from vaebm_jax.models.energy import EnergyNet

  d = np.load(FLAGS.golden)
  rows = []

  def row(name, ours, theirs, impl):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    rows.append(f"| {name} | {impl} | {np.abs(ours - theirs).max():.2e} | {np.abs(theirs).max():.3g} |")

  base, vv, ev = golden_variables(d)
  for impl in ("xla", "fast_cpu"):
    model = base.clone(conv_impl=impl)
    x = nchw_to_nhwc(d["elbo/in/x"])
    for mode in ("eval", "train"):
      eps = [nchw_to_nhwc(d[f"elbo_{mode}/in/eps/{i}"]) for i in range(model.num_groups)]
      out, _ = model.apply(vv, x, mode == "train", eps, mutable=["batch_stats", "normalized_weights"])
      ref = lambda n, mode=mode: d[f"elbo_{mode}/out/{n}"]
      row(f"elbo_{mode}/logits", out.logits, nchw_to_nhwc(ref("logits")), impl)
      row(f"elbo_{mode}/log_q", out.log_q, ref("log_q"), impl)
      row(f"elbo_{mode}/log_p", out.log_p, ref("log_p"), impl)
      row(f"elbo_{mode}/kl_all (all groups)", np.stack(out.kl_all),
          np.stack([ref(f"kl_all/{i}") for i in range(model.num_groups)]), impl)
      row(f"elbo_{mode}/kl_diag (all groups)", np.stack(out.kl_diag),
          np.stack([ref(f"kl_diag/{i}") for i in range(model.num_groups)]), impl)
      row(f"elbo_{mode}/recon_log_prob",
          jnp.sum(distributions.NormalDecoder(out.logits).floored_log_prob(x), axis=(1, 2, 3)), ref("recon_log_prob"),
          impl)
    eps_z = [nchw_to_nhwc(d[f"in/eps_z/{i}"]) for i in range(model.num_groups)]
    eps_x = nchw_to_nhwc(d["in/eps_x"])
    out = nvae.decode_from_eps(model, vv, eps_z, eps_x)
    for ours, theirs in (("logits", "logits"), ("mean", "mean_image"), ("x", "x_sample")):
      row(f"sample/{theirs}", out[ours], nchw_to_nhwc(d[f"out/{theirs}"]), impl)
    row("sample/log_p_z", out["log_p_z"], d["out/log_p_z"], impl)
    row("sample/log_p_x_given_z", out["log_p_x_given_z"], d["out/log_p_x_given_z"], impl)
    ebm = EnergyNet("cifar10", int(d["meta/ebm_channels"]), data_init=False, conv_impl=impl)
    row("energy_data", ebm.apply(ev, nchw_to_nhwc(d["in/x_data"])), d["out/energy_data"], impl)
    params = {"vae": vv, "ebm": ev}
    u, energy = sampling.potential_fn(eps_z, eps_x, params, vae=model, ebm=ebm)
    row("energy (of x_sample)", energy, d["out/energy"], impl)
    row("U (code potential)", u, d["out/U"], impl)
    grads = jax.grad(lambda e: jnp.sum(sampling.potential_fn(e[0], e[1], params, vae=model, ebm=ebm)[0]))(
        (eps_z, eps_x))
    row("dU/deps_z (all groups)", np.concatenate([np.ravel(g) for g in grads[0]]),
        np.concatenate([np.ravel(nchw_to_nhwc(d[f"out/dU_deps_z/{i}"])) for i in range(model.num_groups)]), impl)
    row("dU/deps_x", grads[1], nchw_to_nhwc(d["out/dU_deps_x"]), impl)
  print("| output | conv impl | max abs error | max abs value |\n|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
