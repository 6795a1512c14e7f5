"""Claim 1 at 2-D scale: VAEBM fits a 25-Gaussian mixture better than its VAE, with exact densities.

  python experiments/gaussians25.py                 # full: ~10 min on a 2-core CPU
  python experiments/gaussians25.py --size=smoke --out=/tmp/g25   # seconds (the test suite runs it)

Stage 1 trains the MLP VAE of configs/gaussians25_vae.py, stage 2 the MLP energy of
configs/gaussians25_ebm.py on top of it — the same two loops and the same ε-space sampler as the image
models. In 2-D every density is computed, not estimated:
- log p_data: the mixture's closed form;
- log p_VAE(x) = log ∫ p(x|z) p(z) dz by quadrature on a z-grid (checked against the importance-
  weighted estimate of `metrics.likelihood`, K = 1000, on a subset);
- log h(x) = log p_VAE(x) − E(x) − log Z, with Z = ∫ p_VAE(x) e^{−E(x)} dx on an x-grid.
Test log-likelihoods are means over the 10,000 test points; KL(data ‖ model) = ll_true − ll_model on
the same points (a Monte-Carlo estimate of the KL with exact densities). VAEBM's figures are those of
the stage-2 checkpoint with the best log-likelihood on 10,000 validation points (from the training
split): stage 2 "eventually explodes", and the reference's practice is to evaluate the checkpoints
before it did; every checkpoint's test and validation figures are in the JSON (`by_checkpoint`).

Writes `<out>/gaussians25.json` (keys ll_true, ll_vae, ll_vaebm, kl_vae, kl_vaebm and the checks) and
`<out>/gaussians25.png` (densities and samples of data, VAE and VAEBM side by side).
"""

import functools
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

flags.DEFINE_enum("size", "full", ["full", "smoke"], "full: the RESULTS.md run; smoke: a few steps")
flags.DEFINE_integer("seed", 0, "seed of both stages and of the evaluation")
flags.DEFINE_string("workdir", None, "where the two stages train (default workdirs/claims/gaussians25[_smoke])")
flags.DEFINE_string("out", common.RESULTS, "where the JSON and PNG go")
FLAGS = flags.FLAGS

GRID_RANGE, GRID_POINTS = 6.0, 241          # x-grid for Z and the density plots: spacing 0.05


def main(_):
  common.setup_devices(1)
  import jax
  import numpy as np

  from vaebm_jax import sampling
  from vaebm_jax import workdir as workdir_lib
  from vaebm_jax.data import synthetic
  from vaebm_jax.metrics import likelihood

  smoke = FLAGS.size == "smoke"
  arg = ":smoke" if smoke else ""
  workdir = common.claims_workdir("gaussians25", smoke, FLAGS.workdir)
  start = time.time()
  vae_dir, ebm_dir = os.path.join(workdir, "vae"), os.path.join(workdir, "ebm")
  t_vae = common.run_stage(f"configs/gaussians25_vae.py{arg}", vae_dir, [f"seed={FLAGS.seed}"])
  t_ebm = common.run_stage(f"configs/gaussians25_ebm.py{arg}", ebm_dir,
                           [f"seed={FLAGS.seed}", f"vae_workdir={vae_dir}"])

  from vaebm_jax import checkpoint
  ckpt = checkpoint.Checkpointer(ebm_dir, max_to_keep=None)
  steps = sorted(ckpt.manager.all_steps())
  ckpt.close()
  vae, ebm, params, settings = workdir_lib.load_vaebm(ebm_dir)
  z_points = 200 if smoke else 600
  log_p_vae = functools.partial(likelihood.log_density_on_grid_2d, params["vae"], vae=vae, z_points=z_points)

  test = synthetic.gaussians25("test")
  # Validation points to pick the stage-2 checkpoint (VAEBM training "eventually explodes"; the
  # reference's practice is to evaluate the checkpoints before that): training-split points, not test.
  validation = synthetic.gaussians25("train")[-10_000:]
  if smoke:
    test, validation = test[:500], validation[:500]
  ll_true = float(np.mean(synthetic.gaussians25_log_density(test)))
  lp_test, lp_val = log_p_vae(test), log_p_vae(validation)
  ll_vae = float(np.mean(lp_test))

  # The quadrature against the importance-weighted estimate (an independent computation of log p).
  key = jax.random.key(FLAGS.seed)
  subset = test[:200]
  iw = likelihood.evaluate_log_likelihood(key, params["vae"], subset, vae=vae, num_samples=100 if smoke else 1000,
                                          batch_size=200, chunk=100)["log_px"]

  axis = np.linspace(-GRID_RANGE, GRID_RANGE, GRID_POINTS)
  dx = axis[1] - axis[0]
  grid = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2).astype(np.float32)
  lp_grid = likelihood.log_density_on_xgrid_2d(params["vae"], axis, vae=vae, z_points=z_points).reshape(-1)
  mass_vae = float(np.exp(np.logaddexp.reduce(lp_grid) + 2 * np.log(dx)))

  def vaebm_scores(ebm_params):
    """(log Z, VAEBM's log h on the grid, its mean test and validation log-likelihoods)."""
    energy_fn = jax.jit(lambda x: ebm.apply(ebm_params, x))
    energy = lambda x: np.concatenate([np.asarray(energy_fn(x[i:i + 8192])) for i in range(0, len(x), 8192)])
    log_h_grid = lp_grid - energy(grid)
    log_z = float(np.logaddexp.reduce(log_h_grid) + 2 * np.log(dx))
    return (log_z, log_h_grid, float(np.mean(lp_test - energy(test)) - log_z),
            float(np.mean(lp_val - energy(validation)) - log_z))

  ebm_params = {step: workdir_lib.load_vaebm(ebm_dir, step)[2]["ebm"] for step in steps}
  by_step = {step: vaebm_scores(p) for step, p in ebm_params.items()}
  finite = [st for st in steps if np.isfinite(by_step[st][3])]
  chosen = max(finite, key=lambda st: by_step[st][3]) if finite else steps[-1]
  log_z, log_h_grid, ll_vaebm, _ = by_step[chosen]
  params = dict(params, ebm=ebm_params[chosen])

  # Samples: data, the VAE's x = T(ε) for fresh ε, VAEBM's x after the ε-space chain (the full sample
  # x, not the decoder mean: in 2-D the density is that of x).
  n = 2000 if smoke else 10_000
  k_vae, k_chain = jax.random.split(jax.random.fold_in(key, 1))
  vae_x = np.asarray(sampling.vae_samples(k_vae, params["vae"], vae=vae, num_samples=n, use_mean=False))
  draw = jax.jit(functools.partial(sampling.sample_fn, vae=vae, ebm=ebm, num_samples=n, return_eps=True, **settings))
  _, extras = draw(k_chain, params)
  vaebm_x = np.asarray(vae.decode_from_eps(params["vae"], extras["eps_z"], extras["eps_x"])["x"])

  result = {
      "ll_true": ll_true, "ll_vae": ll_vae, "ll_vaebm": ll_vaebm, "ll_vaebm_last_checkpoint": by_step[steps[-1]][2],
      "stage2_checkpoint": chosen,
      "by_checkpoint": {str(st): {"ll_test": v[2], "ll_validation": v[3], "log_z": v[0]} for st, v in by_step.items()},
      "kl_vae": ll_true - ll_vae, "kl_vaebm": ll_true - ll_vaebm,
      "gap_closed": (ll_vaebm - ll_vae) / (ll_true - ll_vae),
      "checks": {
          "vae_mass_on_grid": mass_vae,
          "iw_minus_quadrature_mean_200_points": float(np.mean(iw - lp_test[:200])),
          "iw_minus_quadrature_max_abs_200_points": float(np.max(np.abs(iw - lp_test[:200]))),
          "log_z": log_z,
      },
      "settings": {"size": FLAGS.size, "seed": FLAGS.seed, "test_points": len(test), "grid": [GRID_RANGE, GRID_POINTS],
                   "z_grid_points": z_points, "langevin": {k: v for k, v in settings.items()}},
      "wall_time_s": {"stage1": t_vae, "stage2": t_ebm, "total": time.time() - start},
      "workdir": workdir,
  }
  common.write_result("gaussians25", FLAGS.out, result)
  plot(os.path.join(FLAGS.out, "gaussians25.png"), axis, synthetic.gaussians25_log_density(grid), lp_grid,
       log_h_grid - log_z, test[:n], vae_x, vaebm_x, result)
  print({k: round(v, 4) for k, v in result.items() if isinstance(v, float)})


def plot(path, axis, log_true, log_vae, log_vaebm, data_x, vae_x, vaebm_x, result):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  size = len(axis)
  fig, axes = plt.subplots(2, 3, figsize=(12, 8))
  extent = (axis[0], axis[-1], axis[0], axis[-1])
  titles = [("data", log_true, data_x, result["ll_true"]), ("VAE", log_vae, vae_x, result["ll_vae"]),
            ("VAEBM", log_vaebm, vaebm_x, result["ll_vaebm"])]
  for col, (name, log_density, samples, ll) in enumerate(titles):
    ax = axes[0, col]
    ax.imshow(np.exp(log_density).reshape(size, size), origin="lower", extent=extent, cmap="viridis")
    ax.set_title(f"{name} density (test LL {ll:.3f})")
    ax = axes[1, col]
    ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.3)
    ax.set_xlim(axis[0], axis[-1])
    ax.set_ylim(axis[0], axis[-1])
    ax.set_aspect("equal")
    ax.set_title(f"{name} samples ({len(samples)})")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
