"""Claim 4 (mode coverage) on stacked digits: three scikit-learn digits as the channels of one
16×16 image, 1000 modes. A VAE and VAEBM are trained on it, 10,000 samples of each are classified
channel by channel with the project's digits classifier, and the modes covered and the KL of the
mode histogram to the uniform one are reported (the StackedMNIST protocol of PacGAN / PresGAN at
the scale of this CPU; VAEBM_SPEC.md §6, §7.3: the paper reports 1000 modes, KL 0.087 on
StackedMNIST).

  python experiments/stacked_digits.py                      # full
  python experiments/stacked_digits.py --size=smoke --out=/tmp/sd

VAE samples are the decoder means of fresh ε; VAEBM samples are the decoder means after the
test-time ε-space chain started from the same ε (so the two sets are paired). Writes
`<out>/stacked_digits.json` (modes_vae, modes_vaebm, kl_vae, kl_vaebm, the same for 10,000 test
images as the classifier's reference) and `<out>/stacked_digits.png` (VAE | VAEBM samples).
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

flags.DEFINE_enum("size", "full", ["full", "smoke"], "full: the RESULTS.md run; smoke: a few steps")
flags.DEFINE_integer("seed", 0, "seed of both stages and of the sampling")
flags.DEFINE_integer("num_samples", 10_000, "samples per model")
flags.DEFINE_string("workdir", None, "where the stages train (default workdirs/claims/stacked_digits[_smoke])")
flags.DEFINE_string("out", common.RESULTS, "where the JSON and PNG go")
FLAGS = flags.FLAGS


def main(_):
  common.setup_devices(2)
  import numpy as np

  from vaebm_jax import evaluate, visualize
  from vaebm_jax.data import synthetic
  from vaebm_jax.metrics import classifier, modes

  smoke = FLAGS.size == "smoke"
  arg = ":smoke" if smoke else ""
  workdir = common.claims_workdir("stacked_digits", smoke, FLAGS.workdir)
  vae_dir, ebm_dir = os.path.join(workdir, "vae"), os.path.join(workdir, "ebm")
  start = time.time()
  t_vae = common.run_stage(f"configs/stacked_digits_vae.py{arg}", vae_dir, [f"seed={FLAGS.seed}"])
  t_ebm = common.run_stage(f"configs/stacked_digits_ebm.py{arg}", ebm_dir,
                           [f"seed={FLAGS.seed}", f"vae_workdir={vae_dir}"])

  n = 64 if smoke else FLAGS.num_samples
  batch = min(500, n)
  t0 = time.time()
  vae_images = evaluate.draw_samples(ebm_dir, n, batch, FLAGS.seed, num_steps=0, progress=False)
  t_vae_sampling = time.time() - t0
  vaebm_images = evaluate.draw_samples(ebm_dir, n, batch, FLAGS.seed)
  t_vaebm_sampling = time.time() - t0 - t_vae_sampling

  fns = classifier.make_classifier_fns(classifier.default_classifier("digits"))
  count = lambda images: modes.count_modes(evaluate.to_unit_range(images, "clip"), fns)
  test_images, _ = synthetic.stacked_digits("test", num=n)
  counted = {"vae": count(vae_images), "vaebm": count(vaebm_images), "test": count(test_images / 255.0)}
  result = {
      "modes_vae": counted["vae"]["modes"], "modes_vaebm": counted["vaebm"]["modes"],
      "kl_vae": counted["vae"]["kl_to_uniform"], "kl_vaebm": counted["vaebm"]["kl_to_uniform"],
      "modes_test_images": counted["test"]["modes"], "kl_test_images": counted["test"]["kl_to_uniform"],
      "num_samples": n,
      "settings": {"size": FLAGS.size, "seed": FLAGS.seed, "classifier": "digits (metrics/weights)",
                   "samples": "decoder means clipped to [0, 1]"},
      "wall_time_s": {"stage1": t_vae, "stage2": t_ebm, "vae_sampling": t_vae_sampling,
                      "vaebm_sampling": t_vaebm_sampling, "total": time.time() - start},
      "workdir": workdir,
  }
  common.write_result("stacked_digits", FLAGS.out, result)
  grid = lambda images: visualize.make_grid(evaluate.to_unit_range(images[:64], "clip"), ncol=8)
  pair = np.concatenate([grid(vae_images), np.full((grid(vae_images).shape[0], 8, 3), 255, np.uint8),
                         grid(vaebm_images)], axis=1)
  visualize.save_png(pair, os.path.join(FLAGS.out, "stacked_digits.png"))
  print({k: v for k, v in result.items() if not isinstance(v, dict)})


if __name__ == "__main__":
  app.run(main)
