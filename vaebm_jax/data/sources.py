"""Random-access image sources. Each returns uint8 arrays (N, H, W, C) or a tfds data source."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from vaebm_jax.errors import DatasetUnavailableError  # noqa: F401  (also re-exported from here)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# name → (tfds name, train split, eval split). CelebA-HQ needs a manual download (tfds docs).
TFDS_DATASETS = {
    "cifar10": ("cifar10", "train", "test"),
    "celeba64": ("celeb_a", "train", "validation"),
    "lsun_church64": ("lsun/church_outdoor", "train", "validation"),
    "celebahq256": ("celeb_a_hq/256", "train[:27000]", "train[27000:]"),   # NVAE: 27k train / 3k validation
}




def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  magic, = struct.unpack(">I", data[:4])
  ndim = magic & 0xFF
  dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, data_dir: str | None = None) -> np.ndarray:
  """Fashion-MNIST images (N, 28, 28, 1) uint8 from IDX files (gzipped or not)."""
  data_dir = data_dir or FASHION_MNIST_DIR
  stem = "train" if split == "train" else "t10k"
  for name in (f"{stem}-images-idx3-ubyte.gz", f"{stem}-images-idx3-ubyte"):
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
      return _read_idx(path)[..., None]
  raise DatasetUnavailableError(
      f"fashion_mnist: no {stem}-images-idx3-ubyte[.gz] in {data_dir}. Install it with "
      f"`apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}) or pass "
      f"--config.data.data_dir=DIR holding the IDX files.")


def digits(split: str) -> np.ndarray:
  """scikit-learn's bundled 8×8 digits (1797 images), nearest-upsampled ×2 to 16×16×1 uint8.

  The first 1500 images are the training split, the remaining 297 the test split.
  """
  from sklearn.datasets import load_digits
  images = load_digits().images                       # values 0..16
  images = np.round(images * (255.0 / 16.0)).astype(np.uint8)
  images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]
  return images[:1500] if split == "train" else images[1500:]


def tfds_source(name: str, split: str, data_dir: str | None):
  """`tfds.data_source` for a prepared dataset, or one clear DatasetUnavailableError.

  Checks that the dataset is prepared (and as ArrayRecord) before calling tfds, which offline
  would otherwise retry downloads or raise a misleading NotImplementedError.
  """
  import tensorflow_datasets as tfds
  tfds_name = TFDS_DATASETS[name][0]
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - unknown name or broken install: say which
    raise DatasetUnavailableError(f"{name}: tfds cannot build {tfds_name!r} ({e})") from e
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 - offline tfds fails in several misleading ways; diagnose
    cause = e
  where = builder.data_dir
  hint = (f"prepare it on a machine with internet access with `tfds build {tfds_name} "
          f"--file_format=array_record` (or tfds.builder('{tfds_name}', file_format='array_record')"
          f".download_and_prepare()) and copy the data_dir here, then pass --config.data.data_dir=DIR")
  if tfds_name.startswith("celeb_a_hq"):
    hint += "; CelebA-HQ needs a manual download first (see the tfds catalog page of celeb_a_hq)"
  if not os.path.exists(os.path.join(where, "dataset_info.json")):
    raise DatasetUnavailableError(f"{name}: tfds dataset {tfds_name!r} is not prepared in {where}; {hint}.")
  file_format = str(getattr(builder.info, "file_format", "") or "")
  if "array_record" not in file_format.lower():
    raise DatasetUnavailableError(
        f"{name}: {tfds_name!r} in {where} is stored as {file_format or 'tfrecord'}, but tfds.data_source "
        f"needs ArrayRecord; {hint}.")
  raise DatasetUnavailableError(f"{name}: tfds.data_source failed for {tfds_name!r} in {where}: {cause}")


def fashion_mnist_labels(split: str, data_dir: str | None = None) -> np.ndarray:
  """Fashion-MNIST class labels (N,) int64, aligned with `fashion_mnist(split, data_dir)`.

  Args:
    split: 'train' (60,000) or anything else for the 10,000 test labels, as `fashion_mnist`.
    data_dir: directory of the IDX files (default FASHION_MNIST_DIR).

  Returns:
    Labels 0..9.
  """
  data_dir = data_dir or FASHION_MNIST_DIR
  stem = "train" if split == "train" else "t10k"
  for name in (f"{stem}-labels-idx1-ubyte.gz", f"{stem}-labels-idx1-ubyte"):
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
      return _read_idx(path).astype(np.int64)
  raise DatasetUnavailableError(
      f"fashion_mnist: no {stem}-labels-idx1-ubyte[.gz] in {data_dir}. Install it with "
      f"`apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}) or pass "
      f"--config.data.data_dir=DIR holding the IDX files.")


def digits_labels(split: str) -> np.ndarray:
  """Labels (N,) int64 of scikit-learn's digits, aligned with `digits(split)` (first 1500 = train).

  Args:
    split: 'train' or anything else for the 297 test labels, as `digits`.

  Returns:
    Labels 0..9.
  """
  from sklearn.datasets import load_digits
  labels = load_digits().target.astype(np.int64)
  return labels[:1500] if split == "train" else labels[1500:]
