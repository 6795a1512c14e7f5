"""grain pipelines over the sources: per-process split, seeded shuffle, random flip, batching."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vaebm_jax.data import sources, synthetic
from vaebm_jax.data.sources import DatasetUnavailableError

POINT_DATASETS = ("gaussians25",)      # vectors (N, 2), not images
KNOWN = ("cifar10", "celeba64", "lsun_church64", "celebahq256", "fashion_mnist", "digits", "stacked_digits") + \
    POINT_DATASETS
GRAYSCALE = ("fashion_mnist", "digits")

# grain is imported where a pipeline is built: the training steps (benchmarks, accelerator images) need none.
if TYPE_CHECKING:
  import grain


def image_channels(name: str) -> int:
  """Channels of the images a dataset yields (1 for the grayscale ones, else RGB)."""
  return 1 if name in GRAYSCALE else 3


def example_shape(name: str, image_size: int | None = None) -> tuple[int, ...]:
  """Shape of one example of a dataset: (2,) for 2-D points, else (image_size, image_size, channels)."""
  if name in POINT_DATASETS:
    return (2,)
  return (image_size, image_size, image_channels(name))


def _to_array(record: Any) -> np.ndarray:
  image = record["image"] if isinstance(record, dict) else record
  return np.asarray(image)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out[..., None] if squeeze else out


def _resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  scale = size / min(h, w)
  pil = Image.fromarray(image)
  return np.asarray(pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR))


def _preprocess(name: str, image: np.ndarray, image_size: int, rng: np.random.Generator | None,
                random_flip: bool) -> np.ndarray:
  """uint8 HWC → float32 HWC in [0, 1], with the reference's crop/resize (VAEBM_SPEC.md §3.4)."""
  if name == "celeba64":
    image = _resize(image[40:188, 15:163], image_size)             # crop box (15, 40, 163, 188)
  elif name == "lsun_church64":
    image = _resize_shorter_side(image, image_size)
    h, w = image.shape[:2]
    if rng is not None:                                              # random crop when training
      top, left = rng.integers(0, h - image_size + 1), rng.integers(0, w - image_size + 1)
    else:
      top, left = (h - image_size) // 2, (w - image_size) // 2
    image = image[top:top + image_size, left:left + image_size]
  elif name == "celebahq256" and image.shape[0] != image_size:
    image = _resize(image, image_size)
  elif name == "fashion_mnist":
    pad = (image_size - image.shape[0]) // 2
    image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  x = image.astype(np.float32) / 255.0
  if random_flip and rng is not None and rng.random() < 0.5:
    x = x[:, ::-1]
  return np.ascontiguousarray(x)


@dataclasses.dataclass
class ImageDataset:
  """Batches of one process: `batches[i]` is the i-th batch (float32 NHWC in [0, 1])."""
  name: str
  num_examples: int            # examples of this split, all processes
  batches: Any                 # grain.MapDataset of np.ndarray batches
  image_shape: tuple
  global_batch_size: int

  @property
  def steps_per_epoch(self) -> int:
    return max(self.num_examples // self.global_batch_size, 1)

  def iterate(self, start: int = 0):
    """Yields batches from index `start` on (infinite for training datasets, one pass otherwise).

    A grain MapDataset wraps indices past its end around, so the length bounds the pass.
    """
    for i in range(start, len(self.batches)):
      yield self.batches[i]


def _rows_of_process(ds: grain.MapDataset, global_batch_size: int, process_index: int,
                     process_count: int) -> grain.MapDataset:
  """Element j of this process is row j % b of its share (b rows) of global batch j // b."""
  import grain
  b = global_batch_size // process_count
  if process_count == 1:
    return ds
  return grain.MapDataset.range(len(ds) // process_count).map(
      lambda j: ds[(j // b) * global_batch_size + process_index * b + j % b])


def create_dataset(name: str, split: str, *, image_size: int | None = None, image_channels: int | None = None,
                   global_batch_size: int,
                   seed: int = 0, train: bool = True, random_flip: bool = False, data_dir: str | None = None,
                   process_index: int = 0, process_count: int = 1) -> ImageDataset:
  """Builds the pipeline of one process.

  Args:
    name: one of KNOWN.
    split: 'train' or 'test'.
    image_size, image_channels: what the model expects; a mismatch is an error (unused for 2-D points).
    global_batch_size: batch over all processes; each process reads its share.
    seed: shuffle and augmentation seed.
    train: shuffle, repeat forever and augment; otherwise one ordered pass.
    random_flip: horizontal flips (training only).
    data_dir: tfds data_dir or IDX directory.
  """
  if name not in KNOWN:
    raise DatasetUnavailableError(f"unknown dataset {name!r}; known: {', '.join(KNOWN)}")
  if global_batch_size % process_count:
    raise ValueError(f"batch size {global_batch_size} is not divisible by {process_count} processes")
  if name == "fashion_mnist":
    source = sources.fashion_mnist(split, data_dir)
  elif name == "digits":
    source = sources.digits(split)
  elif name == "stacked_digits":
    source = synthetic.stacked_digits(split)[0]
  elif name == "gaussians25":
    source = synthetic.gaussians25(split)
  else:
    tfds_split = sources.TFDS_DATASETS[name][1 if split == "train" else 2]
    source = sources.tfds_source(name, tfds_split, data_dir)
  num_examples = len(source)

  import grain
  ds = grain.MapDataset.source(source)
  if train:
    # Shuffle, repeat and augment by *global* example index, then give each process its rows of every
    # global batch: the global batches are the same whatever the number of processes.
    ds = ds.shuffle(seed=seed).repeat()
    if name not in POINT_DATASETS:
      ds = ds.random_map(lambda r, rng: _preprocess(name, _to_array(r), image_size, rng, random_flip), seed=seed + 1)
    ds = _rows_of_process(ds, global_batch_size, process_index, process_count)
  else:
    ds = ds[process_index::process_count]
    if name not in POINT_DATASETS:
      ds = ds.map(lambda r: _preprocess(name, _to_array(r), image_size, None, False))
  ds = ds.batch(global_batch_size // process_count, drop_remainder=train, batch_fn=np.stack)
  if name in POINT_DATASETS:
    return ImageDataset(name, num_examples, ds, (2,), global_batch_size)

  shape = (image_size, image_size, image_channels)
  first = ds[0]
  if tuple(first.shape[1:]) != shape:
    raise ValueError(f"{name} gives images of shape {tuple(first.shape[1:])} but the model expects {shape}; "
                     f"set model.image_size / model.image_channels to match")
  return ImageDataset(name, num_examples, ds, shape, global_batch_size)
