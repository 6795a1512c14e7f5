"""Stage 1: train the NVAE (VAEBM_SPEC.md §5). `train_and_evaluate(config, workdir)`.

Read top to bottom: model and state creation, the jitted train step (one `jax.jit` with donated
state over a ('data',) mesh), evaluation, then the loop with checkpoints, metrics and images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vaebm_jax import data, loop, objectives, optim, parallel
from vaebm_jax import workdir as workdir_lib
from vaebm_jax.models import nvae


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


# The VAE of a stage-1 config (NVAE or MLP VAE by config.model_type); lives with workdir loading.
create_model = workdir_lib.create_vae


def _quantize(model, x: jax.Array) -> jax.Array:
  return nvae.quantize(x, getattr(model, "num_x_bits", 8))


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, epochs: int, lr_scale: float = 1.0):
  """Adamax with NVAE's warm-up + cosine schedule; `lr_scale` (the divergence guard's) scales both ends."""
  schedule = optim.nvae_learning_rate(lr_scale * config.optim.learning_rate, lr_scale * config.optim.learning_rate_min,
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


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What a stage-1 step reads from `config.objective` (§5.6), as a static, hashable argument."""
  kl_anneal_portion: float
  kl_const_portion: float
  kl_const_coeff: float
  kl_balance: bool
  weight_decay_norm: float
  weight_decay_norm_init: float
  weight_decay_norm_anneal: bool
  num_power_iter: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "StepSettings":
    return cls(**{f.name: config.objective[f.name] for f in dataclasses.fields(cls)})


def train_step(state: VAETrainState, batch: jax.Array, key: jax.Array, *, model,
               tx: optax.GradientTransformation, schedule, settings: StepSettings,
               total_steps: int, alpha: np.ndarray):
  """One NVAE update: NELBO with KL warm-up/balancing + λ·(spectral + BN-γ) (§5.6).

  A non-finite loss or gradient leaves params, BN stats, optimiser and u/v untouched (`skipped`).
  """
  obj = settings
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
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_params, new_opt_state = loop.update_if_finite(finite, tx, grads, state.params, state.opt_state)
  keep = lambda new, old: loop.keep_if_finite(finite, new, old)
  new_state = VAETrainState(
      step=state.step + 1,
      params=new_params,
      batch_stats=keep(aux["batch_stats"], state.batch_stats),
      opt_state=new_opt_state,
      spectral=keep(aux["spectral_state"], state.spectral))
  metrics = dict(aux["metrics"], beta=beta, weight_decay_norm=lam, learning_rate=schedule(state.step),
                 grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


def eval_step(variables, batch: jax.Array, key: jax.Array, *, model):
  """Per-example NELBO (β = 1, no balancing) in eval-mode BN, with the model's own p(x|z)."""
  x = _quantize(model, batch)
  out = model.apply(variables, x, False, rngs={"sample": key})
  recon = -objectives.reconstruction_log_prob(model.decoder_distribution(out.logits), x)
  return recon + jnp.sum(jnp.stack(out.kl_all, axis=1), axis=1)


def reconstruct(variables, batch, key, *, model):
  out = model.apply(variables, batch, False, rngs={"sample": key})
  return model.decoder_distribution(out.logits).mean()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> VAETrainState:
  """Trains the NVAE of `config` in `workdir`, resuming from its latest checkpoint if any."""
  run = loop.start(config, workdir)
  mesh, repl, sharded = run.mesh, run.replicated, run.data_sharded

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
  init_key, train_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
  state = run.checkpointer.restore_or_initialize(
      functools.partial(create_train_state, model, tx, image_shape=train_ds.image_shape), init_key, sharding=repl)
  state_sharding = jax.tree.map(lambda _: repl, state)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  logging.info("NVAE: %d parameters, latent groups %s, %d steps per epoch", num_params, model.latent_shapes(),
               steps_per_epoch)

  def make_step(lr_scale):
    tx, schedule = create_optimizer(config, steps_per_epoch, epochs, lr_scale)
    p_train_step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, settings=StepSettings.of(config),
                          total_steps=total_steps, alpha=alpha),
        in_shardings=(state_sharding, sharded, repl), out_shardings=(state_sharding, repl), donate_argnums=0,
        compiler_options=parallel.compiler_options_for(model))
    return lambda state, batch: p_train_step(state, batch, train_key)
  p_eval_step = jax.jit(functools.partial(eval_step, model=model), in_shardings=(repl, sharded, repl),
                        out_shardings=sharded)
  p_reconstruct = jax.jit(functools.partial(reconstruct, model=model), in_shardings=(repl, sharded, repl))

  def sample(variables, key, temperature):   # temperature traced: one program for both grids
    return nvae.sample_images(model, variables, key, config.train.num_image_samples, temperature)
  p_sample = jax.jit(sample)

  def evaluate(state, step):
    nelbos = []
    for i, batch in enumerate(eval_ds.iterate()):
      if i >= config.train.num_eval_batches:
        break
      if batch.shape[0] % mesh.size:  # ragged last batch: drop to keep shapes shardable
        break
      nelbos.append(np.asarray(p_eval_step(state.variables, run.shard(batch), jax.random.fold_in(eval_key, i))))
    nelbo = float(np.mean(np.concatenate(nelbos)))
    dims = float(np.prod(train_ds.image_shape))
    run.writer.write_scalars(step, {"test/nelbo": nelbo, "test/bpd": nelbo / (dims * math.log(2.0))})
    return nelbo

  def write_images(state, step):
    if len(train_ds.image_shape) != 3:       # 2-D points: no image grids
      return
    x = eval_ds.batches[0][: config.train.num_image_samples]
    x = x[: (x.shape[0] // mesh.size) * mesh.size]
    recon = np.asarray(p_reconstruct(state.variables, run.shard(x), eval_key))
    half = x.shape[0] // 2
    pairs = np.stack([x[:half], recon[:half]], axis=1).reshape((-1,) + x.shape[1:])
    loop.write_images(run.writer, workdir, step, {
        "reconstructions": pairs,
        "samples_t1.0": p_sample(state.variables, jax.random.fold_in(eval_key, 1), jnp.float32(1.0)),
        "samples_t0.7": p_sample(state.variables, jax.random.fold_in(eval_key, 2), jnp.float32(0.7)),
    })

  return loop.run(state, make_step, train_ds.iterate, run, total_steps=total_steps, name="NVAE",
                  actions=[(config.train.eval_every_steps, evaluate), (config.train.image_every_steps, write_images)])

