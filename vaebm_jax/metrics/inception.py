"""The FID InceptionV3 in Flax (NHWC), its weights, FID and the Inception Score.

The network is the one of TTUR's FID and pytorch-fid's `fid_inception_v3`: the TF "2015-12-05"
Inception graph, i.e. torchvision's InceptionV3 layout without the auxiliary head and with 1008 output
units, where the FID variants of the mixed blocks differ from torchvision: the pooling branch of the
A/C/E blocks averages without counting padded zeros (TF's average pool), and the last E block
(`Mixed_7c`) max-pools there. Every conv is bias-free, followed by BatchNorm (eps 1e-3, running
statistics) and ReLU. Outputs: pool-3 features (N, 2048) after global average pooling, and the
1008-way logits `pool3 @ W + b` of the graph's `softmax/logits` layer.

Input handling follows pytorch-fid: images in [0, 1], NHWC, grayscale repeated to 3 channels, bilinear
resize to 299×299 as `F.interpolate(mode='bilinear', align_corners=False)` (half-pixel centres,
edge-clamped, no antialiasing), then 2x − 1. That resize is `jax.image.resize(..., 'bilinear',
antialias=False)`; with its default antialias=True, `jax.image.resize` agrees when enlarging (the
32/64/256 → 299 inputs of this project) but low-pass filters when shrinking (512 → 299 differs by up
to 0.58 of the [0, 1] range). TTUR's TF graph and VAEBM's Inception Score script resize instead with
TF1's legacy `resize_bilinear` (no half-pixel centres; `resize_mode='tf1'` here), which differs from
the PyTorch resize by up to ~0.6 on 32×32 inputs; TTUR's graph also scales by (255x − 128)/128 rather
than 2x − 1. Both shift FID a little (pytorch-fid's README notes small differences against TTUR), so
reference statistics and samples must go through the same mode.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TF weights ported), converted once
by `python -m vaebm_jax.metrics.convert_inception` to an `.npz` that `load_params` reads.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from flax import traverse_util

from vaebm_jax.metrics import fid as fid_lib

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
RESIZE_MODES = ("pytorch", "tf1")

FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Images = Union[np.ndarray, Iterable[np.ndarray]]


def interpolation_matrix(in_size: int, out_size: int, mode: str = "pytorch") -> np.ndarray:
  """(out_size, in_size) weights of 1-D linear interpolation.

  Args:
    in_size, out_size: lengths of the input and output axis.
    mode: 'pytorch' — `F.interpolate(mode='bilinear', align_corners=False)` (half-pixel centres, the
      source coordinate clamped at 0); 'tf1' — `tf.compat.v1.image.resize_bilinear` with its defaults
      (source coordinate = output index × in/out).
  Returns:
    float32 matrix M with resized = M @ signal.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
  # Source coordinates in float32, as TF computes them: float64 ones give values that differ from TF's
  # by up to 2e-5 at 512 → 299 (1.8e-7 this way).
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32)
  src = np.maximum(scale * (dst + f32(0.5)) - f32(0.5), f32(0)) if mode == "pytorch" else dst * scale
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = np.clip(src - lo.astype(f32), f32(0), f32(1))
  m = np.zeros((out_size, in_size), f32)
  np.add.at(m, (np.arange(out_size), lo), f32(1) - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def resize_bilinear(images: jax.Array, size: int, mode: str = "pytorch") -> jax.Array:
  """Bilinear resize of NHWC images to size×size.

  Args:
    images: (N, H, W, C) float.
    size: output height and width.
    mode: 'pytorch' — `jax.image.resize(..., antialias=False)`, which is `F.interpolate(mode='bilinear',
      align_corners=False)` to float32 round-off (1e-7 against torch 2.13 for 28…512 → 299); 'tf1' —
      `tf.compat.v1.image.resize_bilinear` (1.8e-7 against TF 2.21), by `interpolation_matrix`.
  Returns:
    (N, size, size, C).
  """
  n, h, w, c = images.shape
  if mode == "pytorch":
    # Without antialias=False, shrinking (e.g. 512 → 299) would low-pass filter first, unlike PyTorch.
    return jax.image.resize(images, (n, size, size, c), "bilinear", antialias=False)
  mh = jnp.asarray(interpolation_matrix(h, size, mode), images.dtype)
  mw = jnp.asarray(interpolation_matrix(w, size, mode), images.dtype)
  hp = jax.lax.Precision.HIGHEST
  out = jnp.einsum("oh,nhwc->nowc", mh, images, precision=hp)
  return jnp.einsum("pw,nowc->nopc", mw, out, precision=hp)


class BasicConv(nn.Module):
  """Conv (no bias) → BatchNorm(eps 1e-3, running statistics) → ReLU: torchvision's BasicConv2d."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TF's average pool ignores the padding (pytorch-fid's count_include_pad=False patch).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  """Mixed_5b/c/d (pytorch-fid's FIDInceptionA)."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision's InceptionB): the 35 → 17 reduction."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b–e (pytorch-fid's FIDInceptionC): factorised 7×7 convolutions."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision's InceptionD): the 17 → 8 reduction."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (`pool='avg'`, FIDInceptionE_1) and Mixed_7c (`pool='max'`, FIDInceptionE_2)."""
  pool: str = "avg"
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "max":   # the TF graph's quirk in its last block (pytorch-fid's FIDInceptionE_2)
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """The FID InceptionV3: images (N, H, W, 1 or 3) → (pool-3 features (N, 2048), logits (N, 1008)).

  Attributes:
    resize_input: resize to 299×299 first (pytorch-fid's default). Without it any size ≥ 75 works
      (the stride-2 stages need it), giving the same parameter shapes.
    normalize_input: map [0, 1] to [−1, 1] (2x − 1); without it inputs must already be in [−1, 1].
    resize_mode: 'pytorch' (pytorch-fid) or 'tf1' (TTUR's graph, VAEBM's IS script); see the module doc.
    precision: of convolutions and the classifier; HIGHEST keeps float32 on GPUs, whose default
      (TF32 on recent NVIDIA chips) would perturb the features by ~1e-3 relative.
  """
  resize_input: bool = True
  normalize_input: bool = True
  resize_mode: str = "pytorch"
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"images must be (N, H, W, 1 or 3), got shape {x.shape}")
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize_input and x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
      x = resize_bilinear(x, INPUT_SIZE, self.resize_mode)
    if self.normalize_input:
      x = 2.0 * x - 1.0
    conv = functools.partial(BasicConv, precision=self.precision)
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = InceptionA(32, self.precision, name="Mixed_5b")(x)
    x = InceptionA(64, self.precision, name="Mixed_5c")(x)
    x = InceptionA(64, self.precision, name="Mixed_5d")(x)
    x = InceptionB(self.precision, name="Mixed_6a")(x)
    x = InceptionC(128, self.precision, name="Mixed_6b")(x)
    x = InceptionC(160, self.precision, name="Mixed_6c")(x)
    x = InceptionC(160, self.precision, name="Mixed_6d")(x)
    x = InceptionC(192, self.precision, name="Mixed_6e")(x)
    x = InceptionD(self.precision, name="Mixed_7a")(x)
    x = InceptionE("avg", self.precision, name="Mixed_7b")(x)
    x = InceptionE("max", self.precision, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=self.precision, name="fc")(pool3)
    return pool3, logits


# ----------------------------------------------------------------------------------------------------
# Weights


@functools.lru_cache(maxsize=1)
def variable_shapes() -> dict[str, tuple[int, ...]]:
  """'/'-joined Flax variable path ('params/Mixed_5b/branch1x1/conv/kernel', ...) → shape."""
  model = InceptionV3FID(resize_input=False)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def _check_shapes(flat: Mapping[str, np.ndarray], what: str, unknown: Iterable[str] = ()) -> None:
  """Raises one ValueError line counting and naming (a few of) the missing, unknown and mis-shaped variables."""
  expected = variable_shapes()
  missing = [k for k in expected if k not in flat]
  unexpected = [*unknown, *(k for k in flat if k not in expected)]
  misshaped = [f"{k} has shape {tuple(flat[k].shape)}, expected {expected[k]}" for k in expected
               if k in flat and tuple(flat[k].shape) != expected[k]]
  if missing or unexpected or misshaped:
    examples = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]] + misshaped[:3]
    raise ValueError(f"{what} does not fit the FID InceptionV3 ({len(missing)} missing, {len(unexpected)} "
                     f"unexpected, {len(misshaped)} mis-shaped): " + "; ".join(examples))


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """pytorch-fid's InceptionV3 state_dict → Flax variables {'params', 'batch_stats'}.

  Args:
    state_dict: name → array under pytorch-fid / torchvision names (`Conv2d_1a_3x3.conv.weight`,
      `Mixed_5b.branch1x1.bn.running_mean`, `fc.weight`, ...); `num_batches_tracked` is ignored.
  Returns:
    The variables of `InceptionV3FID`: conv kernels OIHW → HWIO, `fc.weight` transposed, BN
    weight/bias → scale/bias, running mean/var → 'batch_stats'.
  Raises:
    ValueError: (one line) a tensor is missing, left over or of the wrong shape.
  """
  flat, unknown = {}, []
  for name, value in state_dict.items():
    *modules, leaf = name.split(".")
    value = np.asarray(value)
    if leaf == "num_batches_tracked":
      continue
    if modules and modules[-1] == "conv" and leaf == "weight" and value.ndim == 4:
      key, value = f"params/{'/'.join(modules)}/kernel", value.transpose(2, 3, 1, 0)
    elif modules == ["fc"] and leaf == "weight" and value.ndim == 2:
      key, value = "params/fc/kernel", value.T
    elif modules == ["fc"] and leaf == "bias":
      key = "params/fc/bias"
    elif modules and modules[-1] == "bn" and leaf in ("weight", "bias", "running_mean", "running_var"):
      collection, renamed = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}[leaf]
      key = f"{collection}/{'/'.join(modules)}/{renamed}"
    else:
      unknown.append(name)
      continue
    flat[key] = np.ascontiguousarray(value, np.float32)
  _check_shapes(flat, "state_dict", unknown)
  return traverse_util.unflatten_dict(flat, sep="/")


def random_variables(seed: int = 0) -> dict[str, Any]:
  """Random `InceptionV3FID` variables that keep activations O(1) (He-scaled kernels, random BN
  statistics), for tests and parity checks: fast, unlike `init` on CPU, and with non-trivial BN.

  Args:
    seed: numpy seed.
  Returns:
    {'params', 'batch_stats'} as float32 numpy arrays.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in variable_shapes().items():
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel":
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:   # BN/fc bias, running mean
      value = 0.1 * rng.standard_normal(shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


def save_params(path: str, variables: Mapping[str, Any]) -> None:
  """Writes Flax variables of `InceptionV3FID` to an `.npz` ('/'-joined paths) that `load_params` reads."""
  flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(dict(variables), sep="/").items()}
  _check_shapes(flat, "variables")
  np.savez(path, **flat)


def load_params(path: str) -> dict[str, Any]:
  """Flax variables of `InceptionV3FID` from an `.npz` written by `convert_inception` / `save_params`.

  Args:
    path: the `.npz`; a PyTorch file (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) is also
      accepted and converted on the fly.
  Returns:
    {'params', 'batch_stats'} as numpy arrays.
  Raises:
    ValueError: (one line) the file does not hold the FID InceptionV3 weights.
  """
  if not str(path).endswith(".npz"):
    from vaebm_jax import torch_pickle
    return convert_state_dict(torch_pickle.load_state_dict(path))
  with np.load(path) as f:
    flat = {k: f[k] for k in f.files}
  _check_shapes(flat, str(path))
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------------------------------
# Features, FID, Inception Score


def make_feature_fn(variables: Mapping[str, Any], batch_size: int = 100, resize_mode: str = "pytorch") -> FeatureFn:
  """A function images → (pool-3 features (N, 2048), logits (N, 1008)), both float32 numpy.

  Args:
    variables: from `load_params` (or `random_variables` for tests).
    batch_size: images per jitted call; the last batch is zero-padded, so one shape compiles per
      image size.
    resize_mode: 'pytorch' or 'tf1' (see the module docstring).
  Returns:
    feature_fn(images): images (N, H, W, 1 or 3) in [0, 1] (float) or uint8 in [0, 255].
  """
  model = InceptionV3FID(resize_mode=resize_mode)
  variables = jax.device_put(dict(variables))
  apply = jax.jit(model.apply)

  def feature_fn(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be (N, H, W, 1 or 3) NHWC, got shape {images.shape}")
    features, logits = [], []
    for start in range(0, len(images), batch_size):
      batch = np.asarray(images[start:start + batch_size], np.float32)
      if images.dtype == np.uint8:   # per batch, so a uint8 data set is never held as float32
        batch /= np.float32(255)   # a division, as torchvision's ToTensor in pytorch-fid
      n = len(batch)
      if n < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.float32)])
      f, lg = apply(variables, batch)
      features.append(np.asarray(f)[:n])
      logits.append(np.asarray(lg)[:n])
    if not features:
      return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(features), np.concatenate(logits)

  return feature_fn


def _features(images: Images, feature_fn: FeatureFn) -> np.ndarray:
  if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
    return feature_fn(np.asarray(images))[0]
  return np.concatenate([feature_fn(np.asarray(chunk))[0] for chunk in images])   # chunks of a large set


def reference_statistics_from_images(images: Images, feature_fn: FeatureFn) -> tuple[np.ndarray, np.ndarray]:
  """(μ, Σ) of the pool-3 features of images, e.g. a dataset, for `fid`.

  Args:
    images: (N, H, W, C) in [0, 1], or an iterable of such chunks (for sets too large for memory).
    feature_fn: from `make_feature_fn`.
  Returns:
    float64 mean (2048,) and covariance (2048, 2048); save with `vaebm_jax.metrics.fid.save_statistics`.
  """
  return fid_lib.statistics(_features(images, feature_fn))


def fid(images: Images, reference_stats: Union[str, tuple[np.ndarray, np.ndarray]], feature_fn: FeatureFn) -> float:
  """Fréchet Inception Distance of images against reference statistics.

  Args:
    images: (N, H, W, C) in [0, 1], or an iterable of chunks; the standard protocol uses N = 50 000.
    reference_stats: (μ, Σ), or the path of an `.npz` with 'mu' and 'sigma' (e.g. TTUR's precomputed
      CIFAR-10 statistics, see the module docstring on the resize mode).
    feature_fn: from `make_feature_fn`.
  Returns:
    The FID.
  """
  if isinstance(reference_stats, str):
    reference_stats = fid_lib.load_statistics(reference_stats)
  return fid_lib.fid_from_features(_features(images, feature_fn), reference_stats)


def inception_score(logits: np.ndarray, splits: int = 10, num_classes: int = 1000) -> tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) ‖ p(y))), mean and std over `splits` consecutive parts.

  The 2015 Inception graph has 1008 outputs, of which the last 8 are not ImageNet classes. OpenAI's
  improved-gan code, TTUR and TF-GAN (`classifier_score_from_logits`) take the softmax over all 1008;
  VAEBM's own script (`thirdparty/inception_score.py`, after tsc2017/Inception-Score) takes TF-GAN's
  1008 logits but keeps the first 1000 before the softmax. The default follows VAEBM, whose reported
  numbers this project compares with; pass `num_classes=1008` for the OpenAI/TTUR/TF-GAN variant.
  (OpenAI's and TTUR's code also leave out the logits' bias; ours, like TF-GAN's, include it.)

  Args:
    logits: (N, 1008) from `make_feature_fn`.
    splits: parts of N // splits images (the last ones possibly one more), as the reference scripts.
    num_classes: leading logits that enter the softmax.
  Returns:
    (mean, std) of the per-split scores; std is numpy's (population) standard deviation.
  """
  logits = np.asarray(logits, np.float64)[:, :num_classes]
  if logits.ndim != 2 or len(logits) < splits:
    raise ValueError(f"need logits (N, C) with N >= splits={splits}, got shape {logits.shape}")
  # In log space (the reference scripts use exp/sum) so that confident predictions, whose small
  # probabilities underflow, give the same value instead of 0·(−inf) = NaN.
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  n = len(logits)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_marginal), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))
