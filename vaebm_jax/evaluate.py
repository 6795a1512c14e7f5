"""Modes that inspect or evaluate models: parameter summaries (more in stage 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vaebm_jax.models import nvae


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


_DECODER_PREFIXES = ("prior_ftr0", "dec_tower", "dec_sampler", "post_process", "image_conditional", "stem_decoder")


def nvae_parameter_table(model: nvae.NVAE) -> tuple[list[tuple[str, int]], int, int]:
  """Per top-level module parameter counts (without allocating), the total and the decoder path."""
  x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.image_channels), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, x, True), x)["params"]
  groups: dict[str, int] = {}
  for name, sub in shapes.items():
    owner = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
    groups[owner] = groups.get(owner, 0) + _count(sub)
  decoder = sum(n for k, n in groups.items() if k.startswith(_DECODER_PREFIXES))
  return sorted(groups.items()), _count(shapes), decoder


def parameter_summary(config: ml_collections.ConfigDict) -> str:
  """A parameter overview of the configured models, ending with `total_params: N` per model."""
  lines = []
  model = nvae.NVAE(**config.model.to_dict())
  table, total, decoder = nvae_parameter_table(model)
  lines.append(f"model: nvae ({config.data.name}); latent groups (H, W, C) top first: "
               f"{len(model.latent_shapes())} × {sorted(set(model.latent_shapes()))}")
  lines += [f"  {name:<20s} {n:>14,d}" for name, n in table]
  lines.append(f"  {'decoder path':<20s} {decoder:>14,d}")
  lines.append(f"total_params: {total}")
  return "\n".join(lines)
