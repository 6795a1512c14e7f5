"""Trains the classifiers behind classifier-feature FID and stacked-digit mode counting:

  python experiments/train_classifiers.py [--seed=0]

- Fashion-MNIST: 60,000 training images, tested on the 10,000 test images, both preprocessed as the VAE
  pipeline does (zero-padded to 32×32, float in [0, 1]).
- digits: scikit-learn's digits as the pipeline gives them (16×16), 1500 training / 297 test images.

Writes `vaebm_jax/metrics/weights/{fashion_mnist,digits}_classifier.npz` and
`experiments/results/classifiers.json` (test accuracies, parameter counts, steps, seed, wall times).
"""

import json
import os
import platform
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

flags.DEFINE_integer("seed", 0, "seed of initialisation, batch order and augmentation")
flags.DEFINE_integer("fashion_steps", 3000, "Adam steps for Fashion-MNIST")
flags.DEFINE_integer("digits_steps", 600, "Adam steps for digits")
flags.DEFINE_string("only", "", "train only this one: fashion_mnist | digits")
flags.DEFINE_string("weights_dir", os.path.join(ROOT, "vaebm_jax", "metrics", "weights"), "checkpoint folder")
flags.DEFINE_string("results", os.path.join(ROOT, "experiments", "results", "classifiers.json"), "summary JSON")
FLAGS = flags.FLAGS

# Per dataset: training settings passed to train_classifier (architecture included).
SETTINGS = {
    "fashion_mnist": dict(batch_size=128, learning_rate=2e-3, widths=(32, 64, 64), feature_dim=128, max_shift=0),
    "digits": dict(batch_size=64, learning_rate=2e-3, widths=(32, 64, 64), feature_dim=128, max_shift=2),
}


def main(_):
  import jax
  import numpy as np

  from vaebm_jax.metrics import classifier as clf

  names = [FLAGS.only] if FLAGS.only else list(SETTINGS)
  steps = {"fashion_mnist": FLAGS.fashion_steps, "digits": FLAGS.digits_steps}
  os.makedirs(FLAGS.weights_dir, exist_ok=True)
  os.makedirs(os.path.dirname(FLAGS.results), exist_ok=True)
  summary = {}
  if os.path.exists(FLAGS.results):            # --only keeps the other dataset's entry
    with open(FLAGS.results) as f:
      summary = json.load(f).get("classifiers", {})
  total_start = time.perf_counter()
  for name in names:
    start = time.perf_counter()
    train_x, train_y = clf.labeled_images(name, "train")
    test_x, test_y = clf.labeled_images(name, "test")
    classifier = clf.train_classifier(train_x, train_y, num_classes=10, steps=steps[name], seed=FLAGS.seed,
                                      test_images=test_x, test_labels=test_y, log_every=200, **SETTINGS[name])
    classifier.meta["dataset"] = name
    classifier.meta["num_train"] = int(len(train_x))
    path = os.path.join(FLAGS.weights_dir, f"{name}_classifier.npz")
    clf.save_classifier(path, classifier.variables, classifier.meta)
    wall = time.perf_counter() - start
    summary[name] = {
        "test_accuracy": classifier.meta["test_accuracy"], "num_test": classifier.meta["num_test"],
        "num_train": classifier.meta["num_train"], "num_params": classifier.meta["num_params"],
        "steps": steps[name], "seed": FLAGS.seed, **{k: v for k, v in SETTINGS[name].items()},
        "train_seconds": classifier.meta["train_seconds"], "wall_seconds": round(wall, 1),
        "checkpoint": os.path.relpath(path, ROOT), "checkpoint_bytes": os.path.getsize(path),
    }
    print(f"{name}: test accuracy {classifier.meta['test_accuracy']:.4f} on {classifier.meta['num_test']}, "
          f"{classifier.meta['num_params']} params, {wall:.1f} s, {os.path.getsize(path)} bytes", flush=True)
  result = {
      "command": "python experiments/train_classifiers.py " + " ".join(sys.argv[1:]),
      "total_wall_seconds": round(time.perf_counter() - total_start, 1),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
                 f"({jax.default_backend()})",
      "classifiers": summary,
  }
  with open(FLAGS.results, "w") as f:
    json.dump(jax.tree.map(lambda v: v.item() if isinstance(v, np.generic) else v, result), f, indent=2)
  print(f"wrote {FLAGS.results} ({result['total_wall_seconds']} s)")


if __name__ == "__main__":
  app.run(main)
