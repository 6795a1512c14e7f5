"""Stage 1: train the NVAE (VAEBM_SPEC.md §5). `train_and_evaluate(config, workdir)`.

Read top to bottom: model and state creation, the jitted train step (one `jax.jit` with donated
state over a ('data',) mesh), evaluation, then the loop with checkpoints, metrics and images.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from vaebm_jax import checkpoint, data, objectives, optim, parallel, visualize
from vaebm_jax.models import mlp, nvae

# config.model_type → the VAE class built from config.model (both implement the ELBO path and
# models.interface.LikelihoodVAE).
MODELS = {"nvae": nvae.NVAE, "mlp_vae": mlp.MLPVAE}


@flax.struct.dataclass
class VAETrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  spectral: Any          # power-iteration u, v per weight shape (kept, so checkpointed)

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_model(config: ml_collections.ConfigDict):
  """The VAE of a stage-1 config: `MODELS[config.model_type](**config.model)` (NVAE by default)."""
  model_type = config.get("model_type", "nvae")
  if model_type not in MODELS:
    raise ValueError(f"model_type must be one of {sorted(MODELS)}, got {model_type!r}")
  return MODELS[model_type](**config.model.to_dict())


def _quantize(model, x: jax.Array) -> jax.Array:
  return nvae.quantize(x, getattr(model, "num_x_bits", 8))


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, epochs: int):
  schedule = optim.nvae_learning_rate(config.optim.learning_rate, config.optim.learning_rate_min,
                                      steps_per_epoch, epochs, config.optim.warmup_epochs)
  tx = optim.nvae_optimizer(schedule, config.optim.weight_decay, eps=config.optim.adamax_eps)
  return tx, schedule


def create_train_state(model: nvae.NVAE, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: tuple, batch_size: int = 2) -> VAETrainState:
  """Initialises params, BN stats, optimiser and the power-iteration state (40 iterations)."""
  k_params, k_sample, k_sr = jax.random.split(key, 3)
  x = jnp.full((batch_size,) + tuple(image_shape), 0.5, jnp.float32)
  variables = model.init({"params": k_params, "sample": k_sample}, x, True)   # runs the forward pass
  # Models without weight-normalised convs (the MLP VAE) have no spectral terms and no BN statistics.
  spectral = objectives.init_spectral_state(k_sr, variables.get("normalized_weights", {}), num_iter=40)
  return VAETrainState(jnp.zeros((), jnp.int32), variables["params"], variables.get("batch_stats", {}),
                       tx.init(variables["params"]), spectral)


def train_step(state: VAETrainState, batch: jax.Array, key: jax.Array, *, model,
               tx: optax.GradientTransformation, schedule, config: ml_collections.ConfigDict,
               total_steps: int, alpha: np.ndarray):
  """One NVAE update: NELBO with KL warm-up/balancing + λ·(spectral + BN-γ) (§5.6).

  A non-finite loss or gradient leaves params, BN stats, optimiser and u/v untouched (`skipped`).
  """
  obj = config.objective
  key = jax.random.fold_in(key, state.step)
  x = _quantize(model, batch)
  beta = objectives.kl_coefficient(state.step, total_steps, obj.kl_anneal_portion, obj.kl_const_portion,
                                   obj.kl_const_coeff)
  lam = objectives.annealed_norm_coefficient(beta, obj.weight_decay_norm_init, obj.weight_decay_norm,
                                             obj.weight_decay_norm_anneal)

  def loss_fn(params):
    out, mutated = model.apply({"params": params, "batch_stats": state.batch_stats}, x, True,
                               rngs={"sample": key}, mutable=["batch_stats", "normalized_weights"])
    recon = -objectives.reconstruction_log_prob(model.decoder_distribution(out.logits), x)
    if obj.kl_balance:
      kl, kl_coeffs, kl_vals = objectives.balanced_kl(out.kl_all, beta, alpha)
    else:
      kl_stack = jnp.stack(out.kl_all, axis=1)
      kl, kl_coeffs, kl_vals = beta * jnp.sum(kl_stack, 1), jnp.ones(len(out.kl_all)), jnp.mean(kl_stack, 0)
    spectral, new_spectral = objectives.spectral_norm_penalty(mutated.get("normalized_weights", {}),
                                                              state.spectral, obj.num_power_iter)
    bn = objectives.batchnorm_gamma_penalty(params)
    loss = jnp.mean(recon + kl) + lam * spectral + lam * bn
    aux = {"batch_stats": mutated.get("batch_stats", {}), "spectral_state": new_spectral,
           "metrics": {"loss": loss, "recon": jnp.mean(recon), "kl": jnp.sum(kl_vals),
                       "nelbo": jnp.mean(recon) + jnp.sum(kl_vals), "spectral_norm": spectral, "bn_gamma": bn,
                       "kl_group": kl_vals, "kl_coeff_group": kl_coeffs}}
    return loss, aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = VAETrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      batch_stats=keep(aux["batch_stats"], state.batch_stats),
      opt_state=keep(new_opt_state, state.opt_state),
      spectral=keep(aux["spectral_state"], state.spectral))
  metrics = dict(aux["metrics"], beta=beta, weight_decay_norm=lam, learning_rate=schedule(state.step),
                 grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


def eval_step(variables, batch: jax.Array, key: jax.Array, *, model, config):
  """Per-example NELBO (β = 1, no balancing) in eval-mode BN, with the model's own p(x|z)."""
  del config
  x = _quantize(model, batch)
  out = model.apply(variables, x, False, rngs={"sample": key})
  recon = -objectives.reconstruction_log_prob(model.decoder_distribution(out.logits), x)
  return recon + jnp.sum(jnp.stack(out.kl_all, axis=1), axis=1)


def reconstruct(variables, batch, key, *, model):
  out = model.apply(variables, batch, False, rngs={"sample": key})
  return model.decoder_distribution(out.logits).mean()


def _write_images(writer, workdir: str, step: int, images: dict[str, np.ndarray]) -> None:
  grids = {name: visualize.make_grid(img) for name, img in images.items()}
  for name, grid in grids.items():
    visualize.save_png(grid, os.path.join(workdir, "images", f"{name}_{step:07d}.png"))
  writer.write_images(step, {name: grid[None] for name, grid in grids.items()})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> VAETrainState:
  """Trains the NVAE of `config` in `workdir`, resuming from its latest checkpoint if any."""
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  # Data.
  model = create_model(config)
  common = dict(image_size=model.image_shape[0], image_channels=model.image_shape[-1],
                data_dir=config.data.data_dir, process_index=jax.process_index(),
                process_count=jax.process_count())
  train_ds = data.create_dataset(config.data.name, "train", global_batch_size=config.train.batch_size,
                                 seed=config.seed, train=True, random_flip=config.data.random_flip, **common)
  eval_ds = data.create_dataset(config.data.name, "test", global_batch_size=config.train.eval_batch_size,
                                seed=config.seed, train=False, **common)
  steps_per_epoch = train_ds.steps_per_epoch
  total_steps = (config.train.num_train_steps if config.train.num_train_steps > 0
                 else config.train.epochs * steps_per_epoch)
  epochs = max(int(math.ceil(total_steps / steps_per_epoch)), 1)

  # Model, optimiser, state (initialised replicated by one jit).
  tx, schedule = create_optimizer(config, steps_per_epoch, epochs)
  alpha = objectives.kl_balancer_coefficients(model.groups, "square")
  repl, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  root_key = jax.random.key(config.seed)
  init_key, train_key, eval_key = jax.random.split(root_key, 3)
  ckpt = checkpoint.Checkpointer(workdir, config.train.keep_checkpoints)
  state = ckpt.restore_or_initialize(
      functools.partial(create_train_state, model, tx, image_shape=train_ds.image_shape), init_key, sharding=repl)
  state_sharding = jax.tree.map(lambda _: repl, state)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  logging.info("NVAE: %d parameters, latent groups %s", num_params, model.latent_shapes())
  writer.write_hparams(flatten_config(config))

  p_train_step = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                        total_steps=total_steps, alpha=alpha),
      in_shardings=(state_sharding, sharded, repl), out_shardings=(state_sharding, repl), donate_argnums=0)
  p_eval_step = jax.jit(functools.partial(eval_step, model=model, config=config),
                        in_shardings=(repl, sharded, repl), out_shardings=sharded)
  p_reconstruct = jax.jit(functools.partial(reconstruct, model=model), in_shardings=(repl, sharded, repl))

  def sample(variables, key, temperature):
    return nvae.sample_images(model, variables, key, config.train.num_image_samples, temperature)
  p_sample = jax.jit(sample, static_argnums=2)

  def evaluate(state, step):
    nelbos = []
    for i, batch in enumerate(eval_ds.iterate()):
      if i >= config.train.num_eval_batches:
        break
      if batch.shape[0] % mesh.size:  # ragged last batch: drop to keep shapes shardable
        break
      nelbos.append(np.asarray(p_eval_step(state.variables, parallel.shard_batch(batch, mesh),
                                           jax.random.fold_in(eval_key, i))))
    nelbo = float(np.mean(np.concatenate(nelbos)))
    dims = float(np.prod(train_ds.image_shape))
    writer.write_scalars(step, {"test/nelbo": nelbo, "test/bpd": nelbo / (dims * math.log(2.0))})
    return nelbo

  def write_images(state, step):
    if len(train_ds.image_shape) != 3:       # 2-D points: no image grids
      return
    x = eval_ds.batches[0][: config.train.num_image_samples]
    x = x[: (x.shape[0] // mesh.size) * mesh.size]
    recon = np.asarray(p_reconstruct(state.variables, parallel.shard_batch(x, mesh), eval_key))
    half = x.shape[0] // 2
    pairs = np.stack([x[:half], recon[:half]], axis=1).reshape((-1,) + x.shape[1:])
    _write_images(writer, workdir, step, {
        "reconstructions": pairs,
        "samples_t1.0": np.asarray(p_sample(state.variables, jax.random.fold_in(eval_key, 1), 1.0)),
        "samples_t0.7": np.asarray(p_sample(state.variables, jax.random.fold_in(eval_key, 2), 0.7)),
    })

  # Loop.
  start_step = int(state.step)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  hooks = [report] if jax.process_index() == 0 else []
  logging.info("Training steps %d → %d (%d steps per epoch, %d devices)", start_step, total_steps,
               steps_per_epoch, mesh.size)
  train_metrics = []
  batches = train_ds.iterate(start_step)
  for step in range(start_step + 1, total_steps + 1):
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = p_train_step(state, parallel.shard_batch(next(batches), mesh), train_key)
    train_metrics.append(metrics)
    for hook in hooks:
      hook(step)
    if due(step, config.train.log_every_steps, total_steps):
      scalars = aggregate_metrics(train_metrics)
      writer.write_scalars(step, scalars)
      if scalars["train/skipped"]:
        logging.warning("step %d: %d updates skipped for a non-finite loss", step, scalars["train/skipped"])
      train_metrics = []
    if due(step, config.train.eval_every_steps, total_steps):
      evaluate(state, step)
    if due(step, config.train.image_every_steps, total_steps):
      write_images(state, step)
    if due(step, config.train.checkpoint_every_steps, total_steps):
      ckpt.save(step, state, config)
  ckpt.close()
  writer.flush()
  return state


def due(step: int, every: int, total: int) -> bool:
  """Periodic actions run every `every` steps (never when 0) and at the last step."""
  return step == total or (every > 0 and step % every == 0)


def aggregate_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
  """Means over logged steps (sums for `skipped`); vector metrics become `train_<name>/<index>`."""
  stacked = jax.device_get(history)
  scalars = {}
  for name in stacked[0]:
    values = np.stack([m[name] for m in stacked])
    if values.ndim == 1:
      scalars[f"train/{name}"] = float(values.sum() if name == "skipped" else values.mean())
    else:
      for g, v in enumerate(values.mean(0)):
        scalars[f"train_{name}/{g:02d}"] = float(v)
  return scalars


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update({f"{key}.{k}": v for k, v in flatten_config(value).items()})
    else:
      flat[key] = value if value is not None else "None"
  return flat
