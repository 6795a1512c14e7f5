"""Writes experiments/colab_tpu.ipynb (outputs empty): `python experiments/make_colab_notebook.py`.

The notebook is generated so that its cells stay reviewable as Python here; tests/test_notebook.py
executes it top to bottom on CPU.
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab_tpu.ipynb")

INTRO = """\
# VAEBM in JAX on a Colab TPU

[VAEBM](https://arxiv.org/abs/2010.00654) (Xiao, Kreis, Kautz & Vahdat, ICLR 2021) combines a
pre-trained hierarchical VAE (NVAE) p(x, z) with an energy network E(x) in pixel space,
h(x, z) ∝ p(x, z)·exp(−E(x)). Stage 1 trains the NVAE; stage 2 freezes it and trains E by contrastive
divergence, drawing negatives with short Langevin chains in the VAE's reparameterised noise space
ε = (ε_z, ε_x). The samples are sharper than the VAE's, far cheaper to draw than a pixel-space EBM's,
and cover all modes.

This notebook installs `vaebm_jax`, trains both stages on scikit-learn's bundled 8×8 digits
(upsampled to 16×16, no download needed), then draws samples split across all devices and shows VAE
samples beside VAEBM samples.

**Open in Colab:** File → Upload notebook (or open it from GitHub), then *Runtime → Change runtime
type → TPU*, and set `REPO_URL` in the first code cell to the repository's public URL. The notebook also
runs top to bottom on a CPU (a checkout, or a CPU runtime): there it simulates 4 devices and uses
the tiny `smoke` configs (a few training steps: the point is the plumbing, not the samples). On an
accelerator it trains the full digits configs (`SIZE = "full"`, a few minutes)."""

SETTINGS = '''\
# On Colab: the repository to pip-install, edit this to the public URL of vaebm_jax (not needed in a checkout).
REPO_URL = "https://github.com/YOUR_GITHUB_USER/vaebm_jax"'''

INSTALL = '''\
import glob
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys


def find_repo_root():
  """A checkout of the repository: above the working directory (experiments/ in CI), or Colab's clone."""
  candidates = [os.path.abspath(os.getcwd())]
  while os.path.dirname(candidates[-1]) != candidates[-1]:
    candidates.append(os.path.dirname(candidates[-1]))
  for d in candidates + ["/content/vaebm_jax"]:
    if os.path.isfile(os.path.join(d, "setup.py")) and os.path.isdir(os.path.join(d, "vaebm_jax")):
      return d
  return None


ROOT = find_repo_root()
if ROOT is not None and ROOT not in sys.path:
  sys.path.insert(0, ROOT)   # `import configs` (also installed with the package)

ON_COLAB = "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ
ON_TPU = bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME")
              or os.environ.get("TPU_ACCELERATOR_TYPE") or glob.glob("/dev/accel*"))
ON_GPU = shutil.which("nvidia-smi") is not None


def pip_install(*args):
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *args])


# Skip the install where vaebm_jax and its dependencies already import (a checkout, CI).
if any(importlib.util.find_spec(m) is None for m in ("vaebm_jax", "flax", "ml_collections", "clu", "grain", "orbax")):
  if ROOT is not None:
    pip_install("-e", ROOT)
  elif "YOUR_GITHUB_USER" in REPO_URL:
    raise RuntimeError("vaebm_jax is not installed: set REPO_URL at the top of this cell to the repository's URL")
  else:
    pip_install(f"git+{REPO_URL}")
  importlib.invalidate_caches()
# Installing vaebm_jax may have upgraded jax: bring the accelerator's jax plugin to the same version.
if ON_COLAB and ON_TPU:
  pip_install("-U", "jax[tpu]")
elif ON_COLAB and ON_GPU:
  pip_install("-U", "jax[cuda12]")
print("repository:", ROOT, "| Colab:", ON_COLAB, "| TPU:", ON_TPU, "| GPU:", ON_GPU)'''

DEVICES = '''\
import jax

# Before JAX starts its backends: 4 simulated CPU devices, so that sampling "across all devices" is
# exercised on a CPU too (this only affects the CPU backend; a TPU or GPU is used as it is).
jax.config.update("jax_num_cpu_devices", 4)

print("backend:", jax.default_backend())
print("device count:", jax.device_count())
print("devices:", jax.devices())'''

SIZE_MD = """\
## Train both stages

`SIZE = "smoke"` trains the tiny variants of `configs/digits_vae.py` and `configs/digits_ebm.py` for a
few steps (the default on CPU); `"full"` trains the quickstart configs themselves (the default on a TPU
or GPU). Both stages run in-process through the library (`train_and_evaluate(config, workdir)`), write
checkpoints, TensorBoard events and sample grids to their workdirs, and resume from the latest
checkpoint when re-run, so a finished stage returns at once."""

TRAIN = '''\
import logging

from absl import logging as absl_logging

from configs import digits_ebm, digits_vae
from vaebm_jax import train_ebm, train_vae

# The loops report progress through absl at INFO; orbax's checkpointing chatter is left out.
absl_logging.set_verbosity(absl_logging.INFO)
for handler in logging.getLogger().handlers + [absl_logging.get_absl_handler()]:
  handler.addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)

SIZE = None   # "smoke", "full", or None: smoke on CPU, full on an accelerator
SIZE = SIZE or os.environ.get("VAEBM_NOTEBOOK_SIZE") or ("smoke" if jax.default_backend() == "cpu" else "full")
assert SIZE in ("smoke", "full"), SIZE
variant = "smoke" if SIZE == "smoke" else ""

# Workdirs: $VAEBM_NOTEBOOK_WORKDIR (CI uses a temporary directory), else workdirs/colab/ in the
# repository (gitignored), else ./workdirs/colab (e.g. /content/workdirs/colab on Colab).
base = os.environ.get("VAEBM_NOTEBOOK_WORKDIR") or os.path.join(ROOT or os.getcwd(), "workdirs", "colab")
VAE_WORKDIR = os.path.join(base, f"digits_{SIZE}", "vae")
EBM_WORKDIR = os.path.join(base, f"digits_{SIZE}", "ebm")

# Stage 1: the NVAE.
vae_config = digits_vae.get_config(variant)
train_vae.train_and_evaluate(vae_config, VAE_WORKDIR)

# Stage 2: the energy network on the frozen NVAE of stage 1.
ebm_config = digits_ebm.get_config(variant)
with ebm_config.unlocked():
  ebm_config.vae_workdir = VAE_WORKDIR
train_ebm.train_and_evaluate(ebm_config, EBM_WORKDIR)
print("stage 1:", VAE_WORKDIR, "\\nstage 2:", EBM_WORKDIR)'''

LOAD_MD = """\
## Or load an existing workdir

Sampling needs only a stage-2 (EBM) workdir: its checkpoint names the stage-1 workdir it was trained on,
and `load_vaebm` restores both. To sample from a run trained elsewhere (say `python -m vaebm_jax.main
--config=configs/cifar10_ebm.py --workdir=...` on a TPU VM, copied to Google Drive), skip the training
cell and point `WORKDIR` at it; its stage-1 workdir must be at the path recorded in its config."""

LOAD = '''\
WORKDIR = EBM_WORKDIR   # or the path of any stage-2 workdir, e.g. "/content/drive/MyDrive/cifar10_ebm"'''

SAMPLE_MD = """\
## Sample

`load_vaebm` returns the two Flax modules, their parameters and the sampling settings the EBM was
trained with (Langevin steps, step size, potential, temperature). `sample_fn` is a pure function of
`(key, params)`: jit it with the modules bound, and the `num_samples` chains are split across all
devices (a multiple of the device count). The same key with `num_steps=0` gives the VAE samples the
chains start from, so each VAEBM sample on the right is the refinement of the VAE sample at the same
place on the left.

The sampler pins its log-densities to float32 (on a TPU, several bf16 passes per product). For larger
models on a TPU or GPU, `vae = vae.clone(conv_dtype="bfloat16")` and `ebm = ebm.clone(conv_dtype="bfloat16")`
give the networks' convolutions bf16 operands with float32 accumulation, everything else staying
float32; the sampler stays within float32's tolerance (measured on the CPU and an H100:
`experiments/RESULTS.md`). On a CPU it is slower, so the cell below keeps float32."""

SAMPLE = '''\
import functools

import matplotlib.pyplot as plt
import numpy as np

from vaebm_jax import load_vaebm, sample_fn
from vaebm_jax.visualize import make_grid

vae, ebm, params, settings = load_vaebm(WORKDIR)
print("settings:", settings)

N = 8 * jax.device_count()   # a multiple of the device count: the chains are split across all devices
key = jax.random.key(0)
draw = lambda s: jax.jit(functools.partial(sample_fn, vae=vae, ebm=ebm, num_samples=N, **s))
vaebm_images = draw(settings)(key, params)
vae_images = draw(dict(settings, num_steps=0))(key, params)   # no Langevin steps: the VAE's samples

print("images:", vaebm_images.shape, vaebm_images.dtype)
print("sharding:", vaebm_images.sharding)
for shard in vaebm_images.addressable_shards:
  print(f"  {shard.device}: samples {shard.index[0].start}..{shard.index[0].stop - 1}")

fig, axes = plt.subplots(1, 2, figsize=(12, 6 * N / 64 + 1))
titles = ["VAE samples", f"VAEBM samples ({settings['num_steps']} Langevin steps)"]
for ax, title, images in zip(axes, titles, (vae_images, vaebm_images), strict=True):
  grid = make_grid(np.asarray(images), ncol=8)
  ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
  ax.set_title(title)
  ax.axis("off")
plt.show()'''

END_MD = """\
## Next: the paper's datasets

The full configs train VAEBM at the paper's scale on an accelerator: `configs/cifar10_vae.py` then
`configs/cifar10_ebm.py` (likewise `celeba64_*`, `lsun_church64_*`, `celebahq256_*`), e.g.

```bash
python -m vaebm_jax.main --config=configs/cifar10_vae.py --workdir=workdirs/cifar10_vae
python -m vaebm_jax.main --config=configs/cifar10_ebm.py --workdir=workdirs/cifar10_ebm \\
  --config.vae_workdir=workdirs/cifar10_vae
```

(datasets prepared once with `tfds build cifar10 --file_format=array_record`, see the README). Stage 1
can be skipped by starting stage 2 from an official pre-trained NVAE checkpoint, converted into a
stage-1 workdir:

```bash
python -m vaebm_jax.import_nvae CHECKPOINT.pt workdirs/cifar10_vae
```

Any resulting stage-2 workdir plugs into the *load an existing workdir* cell above."""


def build() -> nbformat.NotebookNode:
  nb = new_notebook()
  nb.metadata.update({
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "accelerator": "TPU",
      "colab": {"provenance": [], "gpuType": "V28"},
  })
  nb.cells = [
      new_markdown_cell(INTRO),
      new_code_cell(SETTINGS, metadata={"tags": ["settings"]}),
      new_code_cell(INSTALL, metadata={"tags": ["install"]}),
      new_code_cell(DEVICES, metadata={"tags": ["devices"]}),
      new_markdown_cell(SIZE_MD),
      new_code_cell(TRAIN, metadata={"tags": ["train"]}),
      new_markdown_cell(LOAD_MD),
      new_code_cell(LOAD, metadata={"tags": ["load"]}),
      new_markdown_cell(SAMPLE_MD),
      new_code_cell(SAMPLE, metadata={"tags": ["sample"]}),
      new_markdown_cell(END_MD),
  ]
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"cell-{i}"   # stable ids: regenerating gives the same file
  return nb


if __name__ == "__main__":
  nbformat.write(build(), PATH)
  print("wrote", PATH)
