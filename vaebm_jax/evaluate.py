"""Modes that inspect or use trained models: parameter summaries and sampling to files."""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from vaebm_jax.models import nvae


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def nvae_parameter_table(model: nvae.NVAE) -> tuple[list[tuple[str, int]], int, int]:
  """Per top-level module parameter counts (without allocating), the total and the decoder path."""
  x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.image_channels), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, x, True), x)["params"]
  groups: dict[str, int] = {}
  for name, sub in shapes.items():
    owner = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
    groups[owner] = groups.get(owner, 0) + _count(sub)
  flat = traverse_util.flatten_dict(shapes)
  decoder = sum(int(np.prod(v.shape)) for k, v in flat.items() if any(nvae.DECODER_MODULES.match(p) for p in k))
  return sorted(groups.items()), _count(shapes), decoder


def ebm_parameter_table(ebm, image_channels: int = 3) -> tuple[list[tuple[str, int]], int]:
  """Per-module counts and the total; they do not depend on the image size (global sum pooling)."""
  x = jax.ShapeDtypeStruct((1, 64, 64, image_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: ebm.init(jax.random.key(0), x), x)["params"]
  return [(name, _count(sub)) for name, sub in shapes.items()], _count(shapes)


def parameter_summary(config: ml_collections.ConfigDict) -> str:
  """A parameter overview of the configured models, ending with a `total_params: N` line per model.

  For a stage-2 config, the NVAE's architecture comes from the stage-1 workdir's saved config when it
  exists, otherwise from the stage-1 config file of the same dataset.
  """
  lines = []
  if config.stage == "ebm":
    from vaebm_jax import train_ebm
    ebm = train_ebm.create_ebm(config)
    from vaebm_jax.data.pipeline import image_channels
    table, total = ebm_parameter_table(ebm, image_channels(config.data.name))
    lines.append(f"model: energy network ({config.ebm.architecture}, n_channel={config.ebm.n_channel})")
    lines += [f"  {name:<20s} {n:>14,d}" for name, n in table]
    lines.append(f"total_params: {total}")
    return "\n".join(lines)
  model = nvae.NVAE(**config.model.to_dict())
  table, total, decoder = nvae_parameter_table(model)
  lines.append(f"model: nvae ({config.data.name}); latent groups (H, W, C) top first: "
               f"{len(model.latent_shapes())} × {sorted(set(model.latent_shapes()))}")
  lines += [f"  {name:<20s} {n:>14,d}" for name, n in table]
  lines.append(f"  {'decoder path':<20s} {decoder:>14,d}")
  lines.append(f"total_params: {total}")
  return "\n".join(lines)


def sample_to_files(workdir: str, num_samples: int, batch_size: int, seed: int = 0) -> str:
  """--mode=sample: draws `num_samples` VAEBM samples in batches from a stage-2 workdir; writes
  `samples/samples.npz` (uint8 NHWC and float images) and PNG grids of each batch. Returns the folder."""
  from vaebm_jax import sampling, visualize
  from vaebm_jax.train_ebm import load_vaebm
  vae, ebm, params, settings = load_vaebm(workdir)
  batch_size = min(batch_size, num_samples)
  draw = jax.jit(functools.partial(sampling.sample_fn, vae=vae, ebm=ebm, num_samples=batch_size, **settings))
  out_dir = os.path.join(workdir, "samples")
  key = jax.random.key(seed)
  images = []
  start = time.time()
  for i in range(-(-num_samples // batch_size)):
    batch = np.asarray(draw(jax.random.fold_in(key, i), params))
    images.append(batch)
    visualize.save_png(visualize.make_grid(batch), os.path.join(out_dir, f"grid_{i:04d}.png"))
    done = min((i + 1) * batch_size, num_samples)
    elapsed = time.time() - start
    print(f"sampled {done}/{num_samples} ({elapsed:.1f} s, {done / elapsed:.2f} images/s)", flush=True)
  images = np.concatenate(images)[:num_samples]
  np.savez_compressed(os.path.join(out_dir, "samples.npz"), images=images,
                      uint8=(np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8))
  return out_dir
