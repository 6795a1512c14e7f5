"""Modes that inspect or use trained models: parameter summaries and sampling to files."""

from __future__ import annotations

import functools
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vaebm_jax.models import interface, nvae


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
  decoder = _count(model.decoder_variables({"params": shapes})["params"])
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
    from vaebm_jax import workdir
    ebm = workdir.create_ebm(config)
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


NORMALIZATIONS = ("clip", "minmax")


def to_unit_range(images: np.ndarray, normalize: str = "clip") -> np.ndarray:
  """Float images → [0, 1] for export.

  'clip': clip to [0, 1] (the decoder mean 0.5μ + 0.5 can leave it, §1.5).
  'minmax': the reference's way (`save_image(normalize=True)` of one image): each image rescaled by
    its own min and max, (x − min)/max(max − min, 1e-5); its FIDs were computed on such PNGs.
  """
  images = np.asarray(images, np.float32)
  if normalize == "clip":
    return np.clip(images, 0.0, 1.0)
  if normalize == "minmax":
    axes = tuple(range(1, images.ndim))
    low, high = images.min(axis=axes, keepdims=True), images.max(axis=axes, keepdims=True)
    return (images - low) / np.maximum(high - low, 1e-5)
  raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[0, 1] floats → uint8 as torchvision's save_image: x·255 + 0.5, clamped, truncated."""
  return np.clip(images * 255.0 + 0.5, 0, 255).astype(np.uint8)


def fingerprint(*parts) -> str:
  """A short hash of `parts` (arrays by their bytes, everything else by its repr)."""
  import hashlib
  h = hashlib.sha256()
  for part in parts:
    for leaf in jax.tree.leaves(part):
      h.update(np.asarray(leaf).tobytes() if isinstance(leaf, (np.ndarray, jax.Array)) else repr(leaf).encode())
  return h.hexdigest()[:16]


def draw_samples(workdir: str, num_samples: int, batch_size: int, seed: int = 0, step: Optional[int] = None,
                 progress: bool = True, cache_dir: Optional[str] = None, **overrides) -> np.ndarray:
  """`num_samples` VAEBM samples (float, unclipped decoder means) from a stage-2 workdir, in batches.

  `step` picks the stage-2 checkpoint (default: the latest); `overrides` replace `sample_fn` settings
  (e.g. num_steps=0 for the VAE alone through the same decoder, space='pixel'). With `cache_dir`,
  every finished batch is kept there under a hash of the parameters, settings, seed and batch size,
  and a rerun (after an interruption) draws only the batches still missing: batch i always uses
  `fold_in(key(seed), i)`, so the result equals an uninterrupted draw.
  """
  from vaebm_jax import parallel, sampling
  from vaebm_jax.workdir import load_vaebm
  vae, ebm, params, settings = load_vaebm(workdir, step)
  settings = dict(settings, **overrides)
  batch_size = min(batch_size, num_samples)
  draw = jax.jit(functools.partial(sampling.sample_fn, vae=vae, ebm=ebm, num_samples=batch_size, clip=False,
                                   **settings),
                 compiler_options=parallel.compiler_options_for(vae))
  if cache_dir is not None:
    cache_dir = os.path.join(cache_dir, fingerprint(params, sorted(settings.items()), seed, batch_size))
    os.makedirs(cache_dir, exist_ok=True)
  params = dict(params, vae=interface.decoder_variables(vae, params["vae"]))   # the sampler only decodes
  key = jax.random.key(seed)
  images, start = [], time.time()
  for i in range(-(-num_samples // batch_size)):
    path = None if cache_dir is None else os.path.join(cache_dir, f"{i:05d}.npy")
    if path is not None and os.path.exists(path):
      images.append(np.load(path))
      continue
    images.append(np.asarray(draw(jax.random.fold_in(key, i), params)))
    if path is not None:
      np.save(path + ".tmp.npy", images[-1])
      os.replace(path + ".tmp.npy", path)
    done = min((i + 1) * batch_size, num_samples)
    if progress:
      elapsed = time.time() - start
      print(f"sampled {done}/{num_samples} ({elapsed:.1f} s, {done / elapsed:.2f} samples/s)", flush=True)
  return np.concatenate(images)[:num_samples]


def sample_to_files(workdir: str, num_samples: int, batch_size: int, seed: int = 0, step: Optional[int] = None,
                    normalize: str = "clip", out_dir: Optional[str] = None) -> str:
  """--mode=sample: draws `num_samples` VAEBM samples in batches from a stage-2 workdir (checkpoint
  `step`, default the latest); writes `samples.npz` (`images`: the raw float decoder means; `uint8`:
  exported with `normalize`, 'clip' or the reference's per-image 'minmax') and PNG grids of 100.
  Returns the folder (default `<workdir>/samples`, or `samples_<step>` for a chosen step)."""
  from vaebm_jax import visualize
  images = draw_samples(workdir, num_samples, batch_size, seed, step)
  out_dir = out_dir or os.path.join(workdir, "samples" if step is None else f"samples_{step}")
  exported = to_unit_range(images, normalize)
  os.makedirs(out_dir, exist_ok=True)
  if images.ndim == 4:
    for i in range(0, len(exported), 100):
      visualize.save_png(visualize.make_grid(exported[i:i + 100]), os.path.join(out_dir, f"grid_{i // 100:04d}.png"))
  np.savez_compressed(os.path.join(out_dir, "samples.npz"), images=images, uint8=to_uint8(exported),
                      normalize=normalize)
  return out_dir


# ---------------------------------------------------------------------------------------------- --mode=eval

CLASSIFIER_DATASETS = {"fashion_mnist": "fashion_mnist", "digits": "digits"}


def sample_quality(images: np.ndarray, dataset: str, reference_images: Optional[np.ndarray] = None, *,
                   inception_weights: Optional[str] = None, fid_reference: Optional[str] = None) -> dict:
  """Sample-quality metrics of images in [0, 1] for a dataset:
  - fashion_mnist, digits: FID in the features of the project's classifier (`metrics.classifier`)
    against `reference_images`;
  - stacked_digits: modes covered and KL to uniform over the 1000 modes (`metrics.modes`);
  - others: FID and Inception Score with the FID InceptionV3 (`metrics.inception`) when
    `inception_weights` (the converted .npz) is given, against `fid_reference` statistics (.npz) or
    `reference_images`.
  """
  from vaebm_jax.metrics import classifier, modes
  if dataset in CLASSIFIER_DATASETS:
    return {"classifier_fid": classifier.classifier_fid(images, reference_images, CLASSIFIER_DATASETS[dataset])}
  if dataset == "stacked_digits":
    counted = modes.count_modes(images, classifier.make_classifier_fns(classifier.default_classifier("digits")))
    return {"modes": int(counted["modes"]), "kl_to_uniform": float(counted["kl_to_uniform"])}
  if inception_weights is None:
    return {"note": "no FID: pass --config.eval.inception_weights=FILE.npz (python -m "
                    "vaebm_jax.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth FILE.npz)"}
  from vaebm_jax.metrics import inception
  feature_fn = inception.make_feature_fn(inception.load_params(inception_weights))
  features, logits = feature_fn(images)
  reference = fid_reference or inception.reference_statistics_from_images(reference_images, feature_fn)
  from vaebm_jax.metrics import fid
  stats = fid.load_statistics(reference) if isinstance(reference, str) else reference
  mean, std = inception.inception_score(logits)
  return {"fid": fid.fid_from_features(features, stats), "inception_score": mean, "inception_score_std": std}


def evaluate(workdir: str, eval_config: ml_collections.ConfigDict, step: Optional[int] = None,
             data_dir: Optional[str] = None) -> dict:
  """--mode=eval on a stage-1 or stage-2 workdir (checkpoint `step`, default the latest).

  Stage 1: importance-weighted test log-likelihood (K = eval.iw_samples) and the sample quality of
  eval.num_samples prior samples (decoder means, t = 1). Stage 2: the same for the VAE and for VAEBM
  samples (test-time chains of the run's config), and the mean unnormalised log h(x) = log p(x) − E(x).
  Writes `<workdir>/eval/metrics_<step>.json` and returns the metrics.
  """
  import json

  from vaebm_jax import data, sampling
  from vaebm_jax.metrics import likelihood
  from vaebm_jax.workdir import WorkdirError, load_vae, load_vaebm, read_config
  config, step = read_config(workdir, step)
  e = eval_config
  key = jax.random.key(e.seed)
  if config.stage == "vae":
    vae, vae_variables, _, _ = load_vae(workdir, step)
    ebm = ebm_variables = settings = None
  elif config.stage == "ebm":
    vae, ebm, params, settings = load_vaebm(workdir, step)
    vae_variables, ebm_variables = params["vae"], params["ebm"]
  else:
    raise WorkdirError(f"{workdir} is neither a stage-1 nor a stage-2 workdir (stage {config.stage!r})")
  name = config.data.name
  shape = tuple(vae.image_shape)
  kw = dict(image_size=shape[0], image_channels=shape[-1]) if len(shape) == 3 else {}
  test_ds = data.create_dataset(name, "test", global_batch_size=e.batch_size, train=False,
                                data_dir=data_dir or config.data.data_dir, **kw)
  test = np.concatenate(list(test_ds.iterate()))[:e.num_test]
  scores = likelihood.evaluate_log_likelihood(key, vae_variables, test, vae=vae, num_samples=e.iw_samples,
                                              batch_size=min(e.batch_size, len(test)), chunk=e.iw_chunk,
                                              ebm=ebm, ebm_variables=ebm_variables)
  metrics = {"step": int(step), "stage": config.stage, "dataset": name, "num_test": int(len(test)),
             "iw_samples": int(e.iw_samples), "test_log_px": float(np.mean(scores["log_px"]))}
  if len(shape) == 3:
    metrics["test_log_px_note"] = ("density of 2x − 1 on [−1, 1] (Gaussian decoder); add "
                                   f"{np.prod(shape) * np.log(2):.1f} nats for x on [0, 1]")
  if "log_h" in scores:
    metrics["test_log_h_unnormalized"] = float(np.mean(scores["log_h"]))
  if len(shape) == 3 and e.num_samples > 0:
    vae_draw = jax.jit(lambda k: sampling.vae_samples(k, vae_variables, vae=vae, num_samples=e.batch_size))
    vae_images = np.concatenate([np.asarray(vae_draw(jax.random.fold_in(key, i)))
                                 for i in range(-(-e.num_samples // e.batch_size))])[:e.num_samples]
    quality = functools.partial(sample_quality, reference_images=test, dataset=name,
                                inception_weights=e.inception_weights, fid_reference=e.fid_reference)
    metrics["vae"] = quality(to_unit_range(vae_images, e.normalize))
    if config.stage == "ebm":
      images = draw_samples(workdir, e.num_samples, e.batch_size, e.seed, step)
      metrics["vaebm"] = quality(to_unit_range(images, e.normalize))
      metrics["langevin"] = {k: v for k, v in settings.items()}
  out = os.path.join(workdir, "eval", f"metrics_{step}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(metrics, f, indent=1, default=float)
  print(json.dumps(metrics, indent=1, default=float))
  return metrics
