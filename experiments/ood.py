"""Claim 3: VAEBM detects out-of-distribution inputs where its VAE fails (VAEBM_SPEC.md §6, §7.3: the
paper's CIFAR-10 vs SVHN AUROC is 0.83 for VAEBM, 0.42 for NVAE).

  python experiments/ood.py                     # on the models of experiments/fashion_mnist.py
  python experiments/ood.py --size=smoke --out=/tmp/ood

In-distribution: the Fashion-MNIST test images. Out-of-distribution, each made 28×28 and zero-padded
to 32×32 as the pipeline pads Fashion-MNIST: scikit-learn's digits (8×8, bilinear to 28×28),
uniform noise, constant images (one uniform grey level each), Fashion-MNIST test images flipped
vertically. Scores: the VAE's importance-weighted log p(x) (K = --iw_samples) and VAEBM's
unnormalised log h(x) = log p(x) − E(x); AUROC of telling in from out with each (higher score = more
in-distribution; 0.5 = chance). Writes `<out>/ood.json` (auroc → {set → {vae, vaebm}}).
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

flags.DEFINE_enum("size", "full", ["full", "smoke"], "full: the RESULTS.md run; smoke: tiny")
flags.DEFINE_integer("seed", 0, "seed of the OOD sets and the importance samples")
flags.DEFINE_integer("num_images", 500, "images per set")
flags.DEFINE_integer("iw_samples", 20, "K of the importance-weighted log p(x)")
flags.DEFINE_string("workdir", None, "the fashion_mnist experiment's workdir (default workdirs/claims/fashion_mnist)")
flags.DEFINE_string("out", common.RESULTS, "where the JSON goes")
FLAGS = flags.FLAGS


def ood_sets(in_images, rng, n):
  """The OOD sets, float32 (n, 32, 32, 1) in [0, 1], 28×28 content zero-padded like Fashion-MNIST."""
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_digits
  pad = lambda x: np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  digits = load_digits().images[rng.permutation(1797)[:n]] / 16.0
  digits = np.stack([np.asarray(Image.fromarray(d.astype(np.float32)).resize((28, 28), Image.BILINEAR))
                     for d in digits])[..., None]
  return {
      "digits": pad(np.clip(digits, 0, 1)).astype(np.float32),
      "uniform_noise": pad(rng.uniform(size=(n, 28, 28, 1))).astype(np.float32),
      "constant": pad(np.broadcast_to(rng.uniform(size=(n, 1, 1, 1)), (n, 28, 28, 1))).astype(np.float32),
      "flipped": in_images[:, ::-1].copy(),        # upside down (the zero border stays in place)
  }


def main(_):
  common.setup_devices(2)
  import jax
  import numpy as np

  from vaebm_jax import evaluate
  from vaebm_jax.metrics import classifier, likelihood, ood
  from vaebm_jax.workdir import load_vaebm

  smoke = FLAGS.size == "smoke"
  arg = ":smoke" if smoke else ""
  workdir = common.claims_workdir("fashion_mnist", smoke, FLAGS.workdir)
  vae_dir, ebm_dir = os.path.join(workdir, "vae"), os.path.join(workdir, "ebm")
  start = time.time()
  common.run_stage(f"configs/fashion_mnist_vae.py{arg}", vae_dir, [f"seed={FLAGS.seed}"])
  common.run_stage(f"configs/fashion_mnist_ebm.py{arg}", ebm_dir, [f"seed={FLAGS.seed}", f"vae_workdir={vae_dir}"])

  n = 16 if smoke else FLAGS.num_images
  k = 2 if smoke else FLAGS.iw_samples
  rng = np.random.default_rng(FLAGS.seed)
  test, _ = classifier.labeled_images("fashion_mnist", "test")
  in_images = test[rng.permutation(len(test))[:n]]
  sets = {"fashion_mnist_test": in_images, **ood_sets(in_images, rng, n)}

  vae, ebm, params, _ = load_vaebm(ebm_dir)
  key = jax.random.key(FLAGS.seed)
  scores = {}
  cache = os.path.join(workdir, "ood_cache")       # finished sets: an interrupted run resumes here
  os.makedirs(cache, exist_ok=True)
  for name, images in sets.items():
    path = os.path.join(cache, f"{name}_{evaluate.fingerprint(params, images, k, FLAGS.seed)}.npz")
    if not os.path.exists(path):
      s = likelihood.evaluate_log_likelihood(key, params["vae"], images, vae=vae, num_samples=k,
                                             batch_size=min(100, n), chunk=min(10, k), ebm=ebm,
                                             ebm_variables=params["ebm"])
      np.savez(path + ".tmp.npz", vae=s["log_px"], vaebm=s["log_h"], energy=s["energy"])
      os.replace(path + ".tmp.npz", path)
    with np.load(path) as f:
      scores[name] = {m: f[m] for m in ("vae", "vaebm", "energy")}
  auroc = {name: {m: ood.auroc(scores["fashion_mnist_test"][m], scores[name][m]) for m in ("vae", "vaebm")}
           for name in sets if name != "fashion_mnist_test"}
  result = {
      "auroc": auroc,
      "mean_scores": {name: {m: float(np.mean(v)) for m, v in s.items()} for name, s in scores.items()},
      "settings": {"size": FLAGS.size, "seed": FLAGS.seed, "num_images": n, "iw_samples": k,
                   "log_px": "density of 2x − 1 on [−1, 1] (NVAE's Gaussian decoder, unfloored)"},
      "wall_time_s": time.time() - start, "workdir": workdir,
  }
  common.write_result("ood", FLAGS.out, result)
  print(auroc)


if __name__ == "__main__":
  app.run(main)
