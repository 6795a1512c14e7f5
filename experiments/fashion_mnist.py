"""Claims 1–2 on Fashion-MNIST: the EBM makes the VAE's samples much better, and short chains in
ε-space are what make it work.

  python experiments/fashion_mnist.py                       # full (hours on a 2-core CPU; resumable)
  python experiments/fashion_mnist.py --size=smoke --out=/tmp/fm

Trains, each through the CLI's stage loops and resuming where a previous run stopped:
- `vae`: the NVAE of configs/fashion_mnist_vae.py (NVAE's unfloored Gaussian likelihood);
- `ebm`: VAEBM's energy on it (configs/fashion_mnist_ebm.py, ε-space chains);
- `ebm_pixel`: the same energy net and loop with negatives from Langevin in pixel space started at
  the VAE's samples (the paper's "EBM on x, MCMC in pixel space initialised from NVAE samples",
  VAEBM_SPEC.md §7.2);
- `ebm_noise`: a plain short-run EBM, pixel-space chains from uniform noise, with more chain steps so
  that its training costs about as much wall time per iteration as VAEBM's (measured and reported).
Pixel-space chains use x ← x − (η/2)∇E(x) + c·√η·ξ with η = 1e-2, c = 0.1 (short-run EBM practice:
a tempered chain), fixed before any result was seen.

Then draws `--num_samples` samples of each (decoder means for the VAE and VAEBM, final x for the
pixel chains; clipped to [0, 1]) and computes their FID in the features of the project's
Fashion-MNIST classifier (`metrics.classifier`, 91.9 % test accuracy) against the 10,000 test
images; and VAEBM's FID against the number of test-time Langevin steps (`--curve_samples` each).
Writes `<out>/fashion_mnist.json` (fid_vae, fid_vaebm, fid_pixel_langevin, fid_ebm_only,
fid_by_steps) and `<out>/fashion_mnist_samples.png`, `<out>/fashion_mnist_fid_by_steps.png`.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

flags.DEFINE_enum("size", "full", ["full", "smoke"], "full: the RESULTS.md run; smoke: a few steps")
flags.DEFINE_integer("seed", 0, "seed of every stage and of the sampling")
flags.DEFINE_integer("num_samples", 10_000, "samples per model for the FIDs")
flags.DEFINE_integer("curve_samples", 1000, "samples per point of the FID-vs-steps curve (the first of the main "
                     "draw's chains: same seed, so every point starts from the same ε and the 0- and test-step "
                     "points reuse the main draw's batches)")
flags.DEFINE_integer("sample_batch", 100, "chains drawn at once (500 needed ~16 GB for the ε-space chains' "
                     "gradient through the NVAE here)")
flags.DEFINE_string("curve_steps", "0,2,4,8,16,32", "test-time Langevin steps of the curve")
flags.DEFINE_integer("noise_chain_steps", 60, "training chain steps of the short-run EBM from noise")
flags.DEFINE_string("workdir", None, "where the stages train (default workdirs/claims/fashion_mnist[_smoke])")
flags.DEFINE_string("out", common.RESULTS, "where the JSON and PNGs go")
FLAGS = flags.FLAGS

PIXEL = ["langevin.space=pixel", "langevin.step_size=0.01", "langevin.noise_scale=0.1", "buffer.use=False"]


def main(_):
  common.setup_devices(2)
  import numpy as np

  from vaebm_jax import evaluate, visualize
  from vaebm_jax.metrics import classifier

  smoke = FLAGS.size == "smoke"
  arg = ":smoke" if smoke else ""
  workdir = common.claims_workdir("fashion_mnist", smoke, FLAGS.workdir)
  dirs = {k: os.path.join(workdir, k) for k in ("vae", "ebm", "ebm_pixel", "ebm_noise")}
  seed = f"seed={FLAGS.seed}"
  start = time.time()
  wall = {"stage1": common.run_stage(f"configs/fashion_mnist_vae.py{arg}", dirs["vae"], [seed])}
  ebm_config = f"configs/fashion_mnist_ebm.py{arg}"
  noise_steps = 2 if smoke else FLAGS.noise_chain_steps
  stage2 = {
      "ebm": [],
      "ebm_pixel": PIXEL + ["langevin.pixel_init=vae_mean"],
      "ebm_noise": PIXEL + ["langevin.pixel_init=noise", f"langevin.train_steps={noise_steps}",
                            f"langevin.test_steps={3 if smoke else max(100, noise_steps)}"],
  }
  for key, overrides in stage2.items():
    wall[key] = common.run_stage(ebm_config, dirs[key], [seed, f"vae_workdir={dirs['vae']}"] + overrides)

  n = 48 if smoke else FLAGS.num_samples
  batch = min(FLAGS.sample_batch, n)
  reference, _ = classifier.labeled_images("fashion_mnist", "test")
  fns = classifier.make_classifier_fns(classifier.default_classifier("fashion_mnist"))
  ref_stats = classifier.classifier_statistics(reference, fns)
  fid = lambda images: classifier.classifier_fid(evaluate.to_unit_range(images, "clip"), ref_stats, fns)

  samples, sampling_time = {}, {}
  cache = os.path.join(workdir, "sample_cache")    # finished batches: an interrupted run resumes here too
  for key, workdir_key, overrides in [("vae", "ebm", {"num_steps": 0}), ("vaebm", "ebm", {}),
                                      ("pixel_langevin", "ebm_pixel", {}), ("ebm_only", "ebm_noise", {})]:
    t0 = time.time()
    samples[key] = evaluate.draw_samples(dirs[workdir_key], n, batch, FLAGS.seed, progress=False, cache_dir=cache,
                                         **overrides)
    sampling_time[key] = time.time() - t0
  result = {f"fid_{k}": fid(v) for k, v in samples.items()}

  curve_n = 48 if smoke else FLAGS.curve_samples
  steps = [0, 2] if smoke else [int(s) for s in FLAGS.curve_steps.split(",")]
  result["fid_by_steps"] = {}
  for k in steps:
    images = evaluate.draw_samples(dirs["ebm"], curve_n, min(FLAGS.sample_batch, curve_n), FLAGS.seed,
                                   progress=False, cache_dir=cache, num_steps=k)
    result["fid_by_steps"][str(k)] = fid(images)
  result.update(
      num_samples=n, curve_samples=curve_n,
      settings={"size": FLAGS.size, "seed": FLAGS.seed, "pixel_chains": PIXEL,
                "noise_chain_steps": noise_steps,
                "fid": "classifier features (metrics/weights/fashion_mnist_classifier.npz) vs the 10,000 test images"},
      wall_time_s=dict(wall, sampling=sampling_time, total=time.time() - start), workdir=workdir)
  common.write_result("fashion_mnist", FLAGS.out, result)

  grids = [visualize.make_grid(evaluate.to_unit_range(samples[k][:64], "clip"), ncol=8) for k in samples]
  gap = np.full((grids[0].shape[0], 8, grids[0].shape[2]), 255, np.uint8)
  row = np.concatenate(sum([[g, gap] for g in grids], [])[:-1], axis=1)
  visualize.save_png(row, os.path.join(FLAGS.out, "fashion_mnist_samples.png"))
  plot_curve(os.path.join(FLAGS.out, "fashion_mnist_fid_by_steps.png"), steps, result)
  print({k: v for k, v in result.items() if not isinstance(v, dict)})


def plot_curve(path, steps, result):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(steps, [result["fid_by_steps"][str(k)] for k in steps], "o-", label="VAEBM (ε-space)")
  ax.axhline(result["fid_vae"], color="gray", ls="--", label="VAE")
  ax.set_xlabel("test-time Langevin steps")
  ax.set_ylabel("classifier FID")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
