"""Fréchet distance between Gaussian fits of features (Heusel et al. 2017), feature statistics and
their `.npz` files. The feature extractor is separate: InceptionV3 pool-3 features (`inception`) for
the paper's datasets, a project classifier's features (`classifier`) for the small ones.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance of features (N, D), in float64 as the reference FID code."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½).

  As TTUR / pytorch-fid: the matrix square root by `scipy.linalg.sqrtm`; if it is singular (non-finite),
  `eps`·I is added to both covariances; a tiny imaginary part from round-off is dropped (a large one
  is an error).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
  """FID of features (N, D) against reference statistics (μ, Σ)."""
  return frechet_distance(*statistics(features), *reference)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes `mu`, `sigma` to an `.npz` (the key names TTUR's and pytorch-fid's files use)."""
  np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads (μ, Σ) from an `.npz` with keys `mu` and `sigma` (TTUR's precomputed files have them)."""
  with np.load(path) as f:
    if "mu" not in f or "sigma" not in f:
      raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(f.keys())}); write it with "
                       f"vaebm_jax.metrics.fid.save_statistics")
    return f["mu"], f["sigma"]
