"""Small CNN classifiers for the grayscale datasets (Fashion-MNIST padded to 32×32, digits 16×16) and
classifier-feature FID: the Fréchet distance between Gaussian fits of the classifier's penultimate
features, the small-dataset stand-in for InceptionV3 FID.

Checkpoints are small `.npz` files (flattened variables + JSON meta); the project's own are committed
under `vaebm_jax/metrics/weights/` and trained by `experiments/train_classifiers.py`:

  fns = make_classifier_fns(default_classifier("fashion_mnist"))
  fid = classifier_fid(samples, reference_images, fns)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from vaebm_jax.metrics import fid

DEFAULT_NAMES = ("fashion_mnist", "digits")
_META_KEY = "__meta__"
_RANGE_SLACK = 1e-5   # decoder means computed in float32 may overshoot [0, 1] by round-off


class SmallCNN(nn.Module):
  """A stride-2 conv3×3 → ReLU per width, then a dense feature layer and a linear head.

  Stride-2 convolutions rather than conv + max-pool: as accurate here and 3-4× faster to train on CPU,
  where XLA's max-pool gradient is slow.
  """
  widths: Sequence[int] = (32, 64, 64)
  feature_dim: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Args: x (N, H, W, C) in [0, 1]. Returns: (features (N, feature_dim), logits (N, num_classes))."""
    x = 2.0 * x - 1.0
    for width in self.widths:
      x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME")(x))
    x = x.reshape(x.shape[0], -1)
    # FID features are taken before the ReLU: no dead (constant) coordinates, closer to Gaussian.
    features = nn.Dense(self.feature_dim)(x)
    logits = nn.Dense(self.num_classes)(nn.relu(features))
    return features, logits


@dataclasses.dataclass
class Classifier:
  """Variables of a SmallCNN and its meta (input_shape, num_classes, widths, feature_dim, test_accuracy, ...)."""
  variables: dict
  meta: dict

  @property
  def module(self) -> SmallCNN:
    return SmallCNN(widths=tuple(self.meta["widths"]), feature_dim=int(self.meta["feature_dim"]),
                    num_classes=int(self.meta["num_classes"]))

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return tuple(int(d) for d in self.meta["input_shape"])

  @property
  def num_classes(self) -> int:
    return int(self.meta["num_classes"])


@dataclasses.dataclass(frozen=True)
class ClassifierFns:
  """Batched, jitted functions on numpy images (N, H, W, C) in [0, 1]; each returns a numpy array."""
  features: Callable[[np.ndarray], np.ndarray]   # (N, feature_dim) float32
  logits: Callable[[np.ndarray], np.ndarray]     # (N, num_classes) float32
  predict: Callable[[np.ndarray], np.ndarray]    # (N,) int64 labels
  input_shape: tuple[int, int, int]
  num_classes: int


def check_images(images: Any, input_shape: Sequence[int]) -> np.ndarray:
  """Validates images against (N, *input_shape) with values in [0, 1].

  Args:
    images: array-like (N, H, W, C), N >= 1.
    input_shape: expected (H, W, C).

  Returns:
    The images as float32, clipped to [0, 1] (values within 1e-5 outside are accepted as round-off).

  Raises:
    ValueError: one line naming the expected and the actual shape/dtype/range.
  """
  h, w, c = (int(d) for d in input_shape)
  expected = f"expected images (N, {h}, {w}, {c}) in [0, 1]"
  x = np.asarray(images)
  if x.dtype.kind not in "biuf":
    raise ValueError(f"{expected}, got dtype {x.dtype} with shape {x.shape}")
  if x.ndim != 4 or x.shape[0] < 1 or tuple(x.shape[1:]) != (h, w, c):
    raise ValueError(f"{expected}, got shape {x.shape}")
  x = x.astype(np.float32)
  if not np.isfinite(x).all():
    raise ValueError(f"{expected}, got non-finite values")
  lo, hi = float(x.min()), float(x.max())
  if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
    raise ValueError(f"{expected}, got values in [{lo:.4g}, {hi:.4g}] (dtype {np.asarray(images).dtype})")
  return np.clip(x, 0.0, 1.0)


def labeled_images(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A grayscale dataset as the VAE pipeline feeds it (float32 in [0, 1]) with its labels.

  Args:
    name: 'fashion_mnist' (28×28 zero-padded to 32×32, as `pipeline._preprocess`) or 'digits' (16×16).
    split: 'train' or 'test'.
    data_dir: Fashion-MNIST IDX directory (default: the Debian package's).

  Returns:
    images (N, H, W, 1) float32, labels (N,) int64.
  """
  from vaebm_jax.data import sources
  if name == "fashion_mnist":
    images, labels = sources.fashion_mnist(split, data_dir), sources.fashion_mnist_labels(split, data_dir)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  elif name == "digits":
    images, labels = sources.digits(split), sources.digits_labels(split)
  else:
    raise ValueError(f"unknown dataset {name!r}; expected one of {DEFAULT_NAMES}")
  return images.astype(np.float32) / 255.0, labels


def _random_shift(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image by up to ±max_shift pixels, filling with zeros (the datasets' background)."""
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
  crop = lambda image, off: jax.lax.dynamic_slice(image, (off[0], off[1], 0), (h, w, image.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def train_classifier(images: np.ndarray, labels: np.ndarray, *, num_classes: int, steps: int, batch_size: int,
                     seed: int, learning_rate: float = 2e-3, widths: Sequence[int] = (32, 64, 64),
                     feature_dim: int = 128, max_shift: int = 2, test_images: np.ndarray | None = None,
                     test_labels: np.ndarray | None = None, log_every: int = 0) -> Classifier:
  """Trains a SmallCNN with Adam (cosine-decayed learning rate) and random-shift augmentation.

  Deterministic for a seed on a given backend: init, batch order and shifts all derive from it.

  Args:
    images: (N, H, W, C) in [0, 1]; labels: (N,) ints in [0, num_classes).
    num_classes, steps, batch_size, seed, learning_rate: as named; batches are drawn epoch-wise without
      replacement.
    widths, feature_dim: architecture (conv widths per stage, penultimate feature size).
    max_shift: augmentation translation in pixels (0 = none).
    test_images, test_labels: if given, meta['test_accuracy'] is measured on them.
    log_every: print loss every this many steps (0 = silent).

  Returns:
    The Classifier; meta records the architecture, the training settings, train_seconds and
    num_params.
  """
  if np.ndim(images) != 4:
    raise ValueError(f"expected images (N, H, W, C) in [0, 1], got shape {np.shape(images)}")
  images = check_images(images, np.shape(images)[1:])
  labels = np.asarray(labels, np.int32)
  if labels.shape != (images.shape[0],) or labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"expected labels ({images.shape[0]},) in [0, {num_classes}), got shape {labels.shape}")
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
  start = time.perf_counter()
  model = SmallCNN(widths=tuple(widths), feature_dim=feature_dim, num_classes=num_classes)
  key = jax.random.key(seed)
  init_key, aug_key = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros((1, *images.shape[1:]), jnp.float32))
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = tx.init(variables)

  @jax.jit
  def train_step(variables, opt_state, x, y, step):
    if max_shift:
      x = _random_shift(jax.random.fold_in(aug_key, step), x, max_shift)

    def loss_fn(v):
      _, logits = model.apply(v, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  order, pos = rng.permutation(len(images)), 0
  for step in range(steps):
    if pos + batch_size > len(order):
      order, pos = rng.permutation(len(images)), 0
    idx = order[pos:pos + batch_size]
    pos += batch_size
    variables, opt_state, loss = train_step(variables, opt_state, images[idx], labels[idx], step)
    if log_every and (step + 1) % log_every == 0:
      print(f"step {step + 1}/{steps} loss {float(loss):.4f}", flush=True)
  variables = jax.tree.map(np.asarray, variables)
  meta = {
      "input_shape": list(images.shape[1:]), "num_classes": num_classes, "widths": list(widths),
      "feature_dim": feature_dim, "steps": steps, "batch_size": batch_size, "seed": seed,
      "learning_rate": learning_rate, "max_shift": max_shift,
      "num_params": int(sum(p.size for p in jax.tree.leaves(variables))),
      "train_seconds": round(time.perf_counter() - start, 2),
  }
  classifier = Classifier(variables, meta)
  if test_images is not None and test_labels is not None:
    predictions = make_classifier_fns(classifier).predict(test_images)
    classifier.meta["test_accuracy"] = float(np.mean(predictions == np.asarray(test_labels)))
    classifier.meta["num_test"] = int(len(predictions))
  return classifier


def save_classifier(path: str, variables: dict, meta: dict) -> None:
  """Writes a compressed `.npz`: one array per variable ('params/Conv_0/kernel', ...) and the JSON meta.

  Args:
    path: output file (numpy appends '.npz' if missing).
    variables: the Flax variables of a SmallCNN.
    meta: JSON-serialisable; needs input_shape, num_classes, widths, feature_dim.
  """
  missing = [k for k in ("input_shape", "num_classes", "widths", "feature_dim") if k not in meta]
  if missing:
    raise ValueError(f"classifier meta lacks {missing}")
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, variables), sep="/")
  np.savez_compressed(path, **flat, **{_META_KEY: np.array(json.dumps(meta, sort_keys=True))})


def load_classifier(path: str) -> Classifier:
  """Reads a checkpoint written by `save_classifier`.

  Args:
    path: the `.npz` file.

  Returns:
    The Classifier (numpy variables, meta dict).
  """
  with np.load(path, allow_pickle=False) as f:
    if _META_KEY not in f:
      raise ValueError(f"{path} is not a classifier checkpoint (no {_META_KEY!r}; keys: {sorted(f.keys())[:5]})")
    meta = json.loads(str(f[_META_KEY]))
    flat = {k: f[k] for k in f.keys() if k != _META_KEY}
  return Classifier(traverse_util.unflatten_dict(flat, sep="/"), meta)


@functools.lru_cache(maxsize=None)
def default_classifier(name: str) -> Classifier:
  """The committed classifier for 'fashion_mnist' (32×32×1) or 'digits' (16×16×1).

  Args:
    name: dataset name.

  Returns:
    The Classifier loaded from `vaebm_jax/metrics/weights/<name>_classifier.npz` (cached: one shared
    object per name, so do not mutate it).
  """
  if name not in DEFAULT_NAMES:
    raise ValueError(f"no default classifier for {name!r}; available: {DEFAULT_NAMES}")
  ref = importlib.resources.files("vaebm_jax.metrics") / "weights" / f"{name}_classifier.npz"
  if not ref.is_file():
    raise FileNotFoundError(f"{ref} is missing; train it with `python experiments/train_classifiers.py`")
  with importlib.resources.as_file(ref) as path:
    return load_classifier(str(path))


def make_classifier_fns(classifier: Classifier, batch_size: int = 500) -> ClassifierFns:
  """Jitted, batched feature / logit / label functions of a classifier on numpy images.

  Args:
    classifier: a Classifier (e.g. from `default_classifier` or `load_classifier`).
    batch_size: images per jitted call; the last chunk is padded so that one shape compiles.

  Returns:
    ClassifierFns whose functions validate (N, H, W, C) in [0, 1] (one-line ValueError otherwise).
  """
  module, variables, shape = classifier.module, jax.tree.map(jnp.asarray, classifier.variables), classifier.input_shape
  apply = jax.jit(module.apply)   # variables as an argument, not baked-in constants

  def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = check_images(images, shape)
    n = len(x)
    chunk = min(batch_size, n)
    feats, logits = [], []
    for i in range(0, n, chunk):
      part = x[i:i + chunk]
      pad = chunk - len(part)
      if pad:
        part = np.concatenate([part, np.zeros((pad, *shape), np.float32)])
      f, lg = apply(variables, part)
      feats.append(np.asarray(f)[:chunk - pad])
      logits.append(np.asarray(lg)[:chunk - pad])
    return np.concatenate(feats), np.concatenate(logits)

  return ClassifierFns(
      features=lambda images: run(images)[0],
      logits=lambda images: run(images)[1],
      predict=lambda images: np.argmax(run(images)[1], axis=-1).astype(np.int64),
      input_shape=shape, num_classes=classifier.num_classes)


def _as_fns(classifier: Classifier | ClassifierFns | str) -> ClassifierFns:
  if isinstance(classifier, str):
    classifier = default_classifier(classifier)
  return classifier if isinstance(classifier, ClassifierFns) else make_classifier_fns(classifier)


def classifier_statistics(images: np.ndarray, classifier: Classifier | ClassifierFns | str
                          ) -> tuple[np.ndarray, np.ndarray]:
  """(μ, Σ) of a classifier's features of images, e.g. to store reference statistics with fid.save_statistics.

  Args:
    images: (N, H, W, C) in [0, 1], N >= 2.
    classifier: Classifier, ClassifierFns, or a default classifier's name.

  Returns:
    Feature mean (D,) and covariance (D, D), float64.
  """
  return fid.statistics(_as_fns(classifier).features(images))


def classifier_fid(samples: np.ndarray, reference: np.ndarray | tuple[np.ndarray, np.ndarray],
                   classifier: Classifier | ClassifierFns | str) -> float:
  """Classifier-feature FID of samples against reference images or reference statistics.

  Args:
    samples: (N, H, W, C) in [0, 1], N >= 2.
    reference: images like `samples`, or a (μ, Σ) pair (e.g. from fid.load_statistics).
    classifier: Classifier, ClassifierFns, or a default classifier's name ('fashion_mnist', 'digits').

  Returns:
    The Fréchet distance of the feature Gaussians.
  """
  fns = _as_fns(classifier)
  if isinstance(reference, (tuple, list)) and len(reference) == 2 and np.ndim(reference[0]) == 1:
    ref_stats = (np.asarray(reference[0]), np.asarray(reference[1]))
  else:
    ref_stats = fid.statistics(fns.features(reference))
  return fid.fid_from_features(fns.features(samples), ref_stats)
