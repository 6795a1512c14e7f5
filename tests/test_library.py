"""The library as other JAX code uses it: the shipped model, `load_vaebm` + `sample_fn` in a fresh
process without TensorFlow or clu, and sampling on any number of devices."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vaebm_jax import evaluate, load_vaebm, sample_fn, workdir


@pytest.mark.slow
def test_shipped_stacked_digits_model_samples_out_of_the_box(tmp_path):
  path = workdir.pretrained("stacked_digits")
  vae, ebm, params, settings = load_vaebm(path)
  assert settings["num_steps"] == 16 and tuple(vae.image_shape) == (16, 16, 3)
  draw = jax.jit(functools.partial(sample_fn, vae=vae, ebm=ebm, num_samples=6, **dict(settings, num_steps=4)))
  images = np.asarray(draw(jax.random.key(0), params))
  assert images.shape == (6, 16, 16, 3) and 0.0 <= images.min() and images.max() <= 1.0
  # digits on black: mostly dark pixels with bright strokes in every channel (each channel is one digit)
  assert 0.02 < images.mean() < 0.4 and (images.reshape(6, -1, 3).max(axis=1) > 0.8).all()
  out = evaluate.sample_to_files(path, num_samples=4, batch_size=4, out_dir=str(tmp_path / "s"))
  assert np.load(os.path.join(out, "samples.npz"))["uint8"].shape == (4, 16, 16, 3)


@pytest.mark.slow
def test_shipped_fashion_mnist_model_samples_out_of_the_box():
  vae, ebm, params, settings = load_vaebm(workdir.pretrained("fashion_mnist"))
  assert tuple(vae.image_shape) == (32, 32, 1)
  draw = jax.jit(functools.partial(sample_fn, vae=vae, ebm=ebm, num_samples=4, **dict(settings, num_steps=2)))
  images = np.asarray(draw(jax.random.key(0), params))
  assert images.shape == (4, 32, 32, 1) and 0.0 <= images.min() and images.max() <= 1.0
  # garments on black: a dark border, a brighter middle, and contrast within every image
  border = np.concatenate([images[:, :3].reshape(4, -1), images[:, -3:].reshape(4, -1)], axis=1).mean(axis=1)
  middle = images[:, 10:22, 10:22].reshape(4, -1).mean(axis=1)
  assert (border < middle).all() and (images.reshape(4, -1).std(axis=1) > 0.1).all(), (border, middle)


@pytest.mark.slow
def test_import_and_draw_need_neither_tensorflow_nor_clu(tmp_path):
  script = tmp_path / "draw.py"
  script.write_text(f"""
import sys, functools
import jax
jax.config.update("jax_num_cpu_devices", 4)
from vaebm_jax import load_vaebm, sample_fn
vae, ebm, params, settings = load_vaebm({workdir.pretrained("stacked_digits")!r})
settings = dict(settings, num_steps=3)
draws = []
for devices in (jax.devices(), jax.devices()[:1]):
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
  draw = jax.jit(functools.partial(sample_fn, vae=vae, ebm=ebm, num_samples=6, mesh=mesh, **settings))
  draws.append(draw(jax.random.key(0), params))
assert draws[0].shape == (6, 16, 16, 3), draws[0].shape
assert float(abs(draws[0] - draws[1]).max()) < 1e-5
heavy = [m for m in ("tensorflow", "clu", "tensorflow_datasets", "grain") if m in sys.modules]
assert not heavy, heavy
print("ok")
""")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=str(tmp_path),
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_training_modules_import_no_input_pipeline_libraries():
  """The stage loops' modules (and so experiments/benchmark.py's workers) import without grain,
  TensorFlow or tfds: accelerator images that lack them (the lent H100's did) can build and time the
  training steps; those libraries load only where a dataset is built."""
  code = ("import sys; import vaebm_jax.train_vae, vaebm_jax.train_ebm, vaebm_jax.data; "
          "print([m for m in ('grain', 'tensorflow', 'tensorflow_datasets') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]"
