"""Mode counting for stacked digits (the StackedMNIST protocol of VEEGAN, PacGAN, PresGAN and VAEBM):
an image's three channels are three digits, so the data has 10³ = 1000 modes (d0, d1, d2). Each channel
is labelled by the digits classifier; reported are the number of modes hit and KL(q ‖ uniform) of the
empirical mode distribution q.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vaebm_jax.metrics.classifier import Classifier, ClassifierFns, make_classifier_fns

NUM_MODES = 1000


def count_modes(images: Any, classifier_fns: ClassifierFns | Classifier) -> dict:
  """Modes of stacked-digit samples.

  Args:
    images: (N, H, W, 3) in [0, 1]; channel k is a digit image of the classifier's input size.
    classifier_fns: a 10-class single-channel digits classifier (`make_classifier_fns(default_classifier
      ('digits'))`), or the Classifier itself.

  Returns:
    dict with `modes` (distinct (d0, d1, d2) triples among the samples), `kl_to_uniform`
    (Σ_{q>0} q·log(q·1000), nats), `histogram` ((1000,) int64 counts, index 100·d0 + 10·d1 + d2),
    `labels` ((N, 3) per-channel labels) and `num_samples`.

  Raises:
    ValueError: one line, for images that are not (N, H, W, 3) in [0, 1] of the classifier's size.
  """
  fns = classifier_fns if isinstance(classifier_fns, ClassifierFns) else make_classifier_fns(classifier_fns)
  h, w, c = fns.input_shape
  if c != 1 or fns.num_classes != 10:
    raise ValueError(f"count_modes needs a 10-class single-channel classifier, got input {fns.input_shape} "
                     f"with {fns.num_classes} classes")
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[0] < 1 or x.shape[1:] != (h, w, 3):
    raise ValueError(f"expected stacked images (N, {h}, {w}, 3) in [0, 1], got shape {x.shape}")
  n = x.shape[0]
  channels = np.moveaxis(x, -1, 1).reshape(n * 3, h, w, 1)      # sample-major: rows 3i..3i+2 are sample i
  try:
    labels = fns.predict(channels).reshape(n, 3)
  except ValueError as e:                                         # name the stacked shape, not the per-channel one
    raise ValueError(f"expected stacked images (N, {h}, {w}, 3) in [0, 1]; {e}") from None
  index = labels @ np.array([100, 10, 1])
  histogram = np.bincount(index, minlength=NUM_MODES).astype(np.int64)
  q = histogram[histogram > 0] / n
  return {
      "modes": int(np.count_nonzero(histogram)),
      "kl_to_uniform": float(np.sum(q * np.log(q * NUM_MODES))),
      "histogram": histogram,
      "labels": labels,
      "num_samples": int(n),
  }


def stack_digits(images: np.ndarray, labels: np.ndarray, triples: np.ndarray, seed: int = 0) -> np.ndarray:
  """Builds stacked-digit images: for each triple, a random image of each digit as the channels.

  Args:
    images: (N, H, W, 1) digit images; labels: (N,) their labels.
    triples: (M, 3) digits to stack (each present in `labels`).
    seed: which image of a digit is drawn.

  Returns:
    (M, H, W, 3) with images' dtype.
  """
  images, labels, triples = np.asarray(images), np.asarray(labels), np.asarray(triples)
  rng = np.random.default_rng(seed)
  by_digit = {d: np.flatnonzero(labels == d) for d in np.unique(triples)}
  missing = [int(d) for d, idx in by_digit.items() if len(idx) == 0]
  if missing:
    raise ValueError(f"stack_digits: no image of digit(s) {missing} among the labels")
  picks = np.stack([[rng.choice(by_digit[d]) for d in triple] for triple in triples])    # (M, 3)
  return images[picks][..., 0].transpose(0, 2, 3, 1)
