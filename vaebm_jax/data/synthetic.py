"""Datasets made here, offline and deterministic: the 2-D mixture of 25 Gaussians and stacked digits.

Both are fixed arrays (the same for every run and process); training order and augmentation come
from the pipeline's seeded shuffle as for the other datasets.
"""

from __future__ import annotations

import math

import numpy as np

from vaebm_jax.data import sources

# 25 Gaussians: means on the grid {−4, −2, 0, 2, 4}², equal weights, isotropic std 0.1.
GAUSSIANS25_MEANS = np.array([(x, y) for x in range(-4, 5, 2) for y in range(-4, 5, 2)], np.float64)
GAUSSIANS25_STD = 0.1
_SIZES = {"train": 100_000, "test": 10_000}
_SEEDS = {"train": 1234, "test": 5678}


def gaussians25(split: str) -> np.ndarray:
  """Points (N, 2) float32 from the mixture: 100,000 for 'train', 10,000 for 'test' (other seeds)."""
  rng = np.random.default_rng(_SEEDS[split])
  n = _SIZES[split]
  centres = GAUSSIANS25_MEANS[rng.integers(0, len(GAUSSIANS25_MEANS), n)]
  return (centres + GAUSSIANS25_STD * rng.standard_normal((n, 2))).astype(np.float32)


def gaussians25_log_density(x: np.ndarray) -> np.ndarray:
  """Exact log p_data(x) of the mixture, x (..., 2)."""
  x = np.asarray(x, np.float64)[..., None, :]
  sq = np.sum((x - GAUSSIANS25_MEANS) ** 2, axis=-1) / GAUSSIANS25_STD ** 2
  log_comp = -0.5 * sq - math.log(2 * math.pi * GAUSSIANS25_STD ** 2) - math.log(len(GAUSSIANS25_MEANS))
  m = log_comp.max(axis=-1, keepdims=True)
  return (m + np.log(np.sum(np.exp(log_comp - m), axis=-1, keepdims=True)))[..., 0]


def stacked_digits(split: str, num: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Three scikit-learn digits of the split stacked as the channels of one image (StackedMNIST at 16×16).

  Returns uint8 images (N, 16, 16, 3) and their labels (N, 3): 1000 modes (d0, d1, d2). 'train'
  stacks the 1500 training digits (50,000 images), 'test' the 297 test digits (10,000 images).
  """
  digits = sources.digits(split)[..., 0]
  from sklearn.datasets import load_digits
  labels = load_digits().target
  labels = labels[:1500] if split == "train" else labels[1500:]
  rng = np.random.default_rng(_SEEDS[split] + 1)
  n = num or (50_000 if split == "train" else 10_000)
  idx = rng.integers(0, len(digits), (n, 3))
  return np.stack([digits[idx[:, c]] for c in range(3)], axis=-1), labels[idx]
