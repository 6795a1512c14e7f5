"""Input pipelines: deterministic, per-process, and one clear error for every missing dataset."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vaebm_jax import data
from vaebm_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_batches_are_deterministic_and_indexable():
  make = lambda seed: data.create_dataset("digits", "train", image_size=16, image_channels=1, global_batch_size=8,
                                          seed=seed, train=True)
  a, b, c = make(0), make(0), make(1)
  np.testing.assert_array_equal(a.batches[5], b.batches[5])      # a resumed run reads the same batch
  assert not np.array_equal(a.batches[5], c.batches[5])
  x = a.batches[0]
  assert x.shape == (8, 16, 16, 1) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
  assert a.num_examples == 1500 and a.steps_per_epoch == 187


def test_processes_read_disjoint_shares():
  kw = dict(image_size=16, image_channels=1, global_batch_size=4, train=False, process_count=2)
  p0 = data.create_dataset("digits", "test", process_index=0, **kw)
  p1 = data.create_dataset("digits", "test", process_index=1, **kw)
  assert p0.batches[0].shape == (2, 16, 16, 1)
  assert not np.array_equal(p0.batches[0], p1.batches[0])


@pytest.mark.parametrize("name, kw", [("gaussians25", {}),
                                      ("digits", dict(image_size=16, image_channels=1, random_flip=True))])
def test_training_batches_are_the_same_global_batches_on_any_number_of_processes(name, kw):
  """Process p reads rows p·b … (p+1)·b − 1 of every global batch (shuffle and augmentation by global index)."""
  full = data.create_dataset(name, "train", global_batch_size=12, seed=1, train=True, **kw)
  for count in (2, 3):
    parts = [data.create_dataset(name, "train", global_batch_size=12, seed=1, train=True, process_index=p,
                                 process_count=count, **kw) for p in range(count)]
    for i in (0, 1, 777):
      np.testing.assert_array_equal(np.concatenate([q.batches[i] for q in parts]), full.batches[i])


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_is_padded_to_32():
  ds = data.create_dataset("fashion_mnist", "test", image_size=32, image_channels=1, global_batch_size=16,
                           train=False)
  x = ds.batches[0]
  assert x.shape == (16, 32, 32, 1) and ds.num_examples == 10_000
  assert np.all(x[:, :2] == 0) and np.all(x[:, :, -2:] == 0) and x.max() > 0.5


def test_cifar10_pipeline_with_mock_data():
  with tfds.testing.mock_data(num_examples=16):
    ds = data.create_dataset("cifar10", "train", image_size=32, image_channels=3, global_batch_size=8,
                             train=True, random_flip=True)
    x = ds.batches[0]
  assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32 and x.max() <= 1.0


def test_celeba64_pipeline_crops_and_resizes_with_mock_data():
  with tfds.testing.mock_data(num_examples=4):
    ds = data.create_dataset("celeba64", "test", image_size=64, image_channels=3, global_batch_size=2, train=False)
    assert ds.batches[0].shape == (2, 64, 64, 3)


def test_missing_fashion_mnist_names_the_fix(tmp_path):
  with pytest.raises(data.DatasetUnavailableError, match="apt-get install dataset-fashion-mnist") as e:
    data.create_dataset("fashion_mnist", "train", image_size=32, image_channels=1, global_batch_size=8,
                        data_dir=str(tmp_path))
  assert str(tmp_path) in str(e.value)


def test_unprepared_tfds_dataset_names_where_and_what_to_do(tmp_path):
  with pytest.raises(data.DatasetUnavailableError, match=r"cifar10.*not prepared in .*tfds build cifar10"):
    data.create_dataset("cifar10", "train", image_size=32, image_channels=3, global_batch_size=8,
                        data_dir=str(tmp_path))


def test_unknown_dataset_and_shape_mismatch_are_clear_errors():
  with pytest.raises(data.DatasetUnavailableError, match="unknown dataset 'mnist3d'"):
    data.create_dataset("mnist3d", "train", image_size=32, image_channels=1, global_batch_size=8)
  with pytest.raises(ValueError, match=r"expects \(32, 32, 1\)"):
    data.create_dataset("digits", "train", image_size=32, image_channels=1, global_batch_size=8)


def test_command_line_reports_a_missing_dataset_in_one_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, "-m", "vaebm_jax.main", "--config=configs/fashion_mnist_vae.py:smoke",
       f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={tmp_path / 'nowhere'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "apt-get install dataset-fashion-mnist" in errors[0]
  assert "Traceback" not in result.stderr
