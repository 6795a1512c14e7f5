"""Stage 2: train the energy network on top of a frozen stage-1 NVAE (VAEBM_SPEC.md §3).

`train_and_evaluate(config, workdir)`: positives from data, negatives from short ε-space Langevin
chains (fresh or from the replay buffer), loss E⁺ − E⁻ + α_s·SR, IGEBM clip, Adam(0.99, 0.999).
The run records the stage-1 checkpoint it trains on in `<workdir>/stage1.json`
(`workdir.load_vaebm` reads it back).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vaebm_jax import data, loop, objectives, optim, parallel, sampling
from vaebm_jax import workdir as workdir_lib
from vaebm_jax.models import interface, nvae
from vaebm_jax.models.energy import EnergyNet
from vaebm_jax.workdir import WorkdirError, create_ebm, sampling_settings


@flax.struct.dataclass
class EBMTrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  spectral: Any                         # power-iteration u, v per weight shape
  buffer: Optional[sampling.ReplayBuffer]


# ---------------------------------------------------------------------------------------------- models


def create_optimizer(config: ml_collections.ConfigDict, lr_scale: float = 1.0) -> optax.GradientTransformation:
  """Adam with coupled L2 and the IGEBM clip; `lr_scale` is the divergence guard's."""
  o = config.optim
  return optim.ebm_optimizer(lr_scale * o.learning_rate, o.weight_decay, o.b1, o.b2, clip=o.grad_clip)


@dataclasses.dataclass(frozen=True)
class ChainSettings:
  """The training chains of `config.langevin` (§2), as a static, hashable argument."""
  num_steps: int
  step_size: float
  potential: str
  temperature: float
  unroll: int
  noise_scale: float
  space: str
  pixel_init: str

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "ChainSettings":
    lv = config.langevin
    return cls(lv.train_steps, lv.step_size, lv.potential, lv.temperature, lv.unroll, lv.noise_scale, lv.space,
               lv.pixel_init)


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What a stage-2 step reads from its config (`objective`, `langevin`, `buffer`)."""
  alpha_s: float
  use_mu_cd: bool
  chain: ChainSettings
  replay_p_max: float
  replay_anneal_steps: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "StepSettings":
    return cls(config.objective.alpha_s, config.objective.use_mu_cd, ChainSettings.of(config), config.buffer.p_max,
               config.buffer.anneal_steps)


def create_train_state(ebm: EnergyNet, vae: nvae.NVAE, tx, key: jax.Array, init_images: jax.Array,
                       buffer_capacity: int = 0, buffer_shards: int = 1) -> EBMTrainState:
  """Initialises the EBM on real images (data-dependent init when enabled: Linen's init runs the real
  forward pass), the optimiser, the power-iteration state and an empty replay buffer of
  `buffer_capacity` ε_z per shard, `buffer_shards` shards (none when the capacity is 0)."""
  k_params, k_sr = jax.random.split(key)
  variables = ebm.init(k_params, init_images)
  spectral = objectives.init_spectral_state(k_sr, variables.get("normalized_weights", {}), num_iter=40)
  buffer = sampling.init_replay_buffer(vae, buffer_capacity, buffer_shards) if buffer_capacity else None
  return EBMTrainState(jnp.zeros((), jnp.int32), variables["params"], tx.init(variables["params"]), spectral, buffer)


def state_shardings(state: EBMTrainState, mesh: jax.sharding.Mesh) -> EBMTrainState:
  """Replicated, but each device holds its own shard of the replay buffer (`sampling.buffer_shardings`)."""
  repl = parallel.replicated(mesh)
  buffer = None if state.buffer is None else sampling.buffer_shardings(state.buffer, mesh)
  return state.replace(**{k: jax.tree.map(lambda _: repl, getattr(state, k))
                          for k in ("step", "params", "opt_state", "spectral")}, buffer=buffer)


# ---------------------------------------------------------------------------------------------- step


def negatives(state: EBMTrainState, key: jax.Array, *, vae, vae_variables, ebm, settings: StepSettings,
              batch_size: int, mesh=None):
  """Short-run Langevin from fresh noise (or the buffer); returns x⁻ and chain diagnostics.

  `langevin.space='eps'` is VAEBM (§3.1); 'pixel' runs the chain on x with U = E(x) from
  `langevin.pixel_init` (VAE samples: the paper's x-space ablation; 'noise': a short-run EBM).
  """
  lv = settings.chain
  k_init, k_buffer, k_chain = jax.random.split(key, 3)
  params = {"vae": vae_variables, "ebm": {"params": jax.lax.stop_gradient(state.params)}}
  if lv.space == "pixel":
    x = sampling.initial_pixels(k_init, params, vae=vae, num_samples=batch_size, init=lv.pixel_init,
                                temperature=lv.temperature, mesh=mesh)
    x, chain_energies, _ = sampling.langevin_chain(
        x, k_chain, lambda x: sampling.pixel_potential_fn(x, params, ebm=ebm), num_steps=lv.num_steps,
        step_size=lv.step_size, unroll=lv.unroll, noise_scale=lv.noise_scale)
    return jax.lax.stop_gradient(x), None, chain_energies, jnp.zeros((), jnp.int32)
  eps_z, eps_x = sampling.initial_noise(k_init, vae, batch_size, mesh)
  num_replayed = jnp.zeros((), jnp.int32)
  if state.buffer is not None:
    probability = sampling.replay_probability(state.step, settings.replay_p_max, settings.replay_anneal_steps)
    eps_z, num_replayed = sampling.sample_initial_eps_z(state.buffer, k_buffer, eps_z, probability)
  potential = lambda e: sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm, potential=lv.potential,
                                              temperature=lv.temperature)
  (eps_z, eps_x), chain_energies, _ = sampling.langevin_chain(
      (eps_z, eps_x), k_chain, potential, num_steps=lv.num_steps, step_size=lv.step_size, unroll=lv.unroll,
      noise_scale=lv.noise_scale)
  eps_z, eps_x = jax.lax.stop_gradient((eps_z, eps_x))
  out = vae.decode_from_eps(vae_variables, eps_z, eps_x, lv.temperature)
  x_neg = out["mean"] if settings.use_mu_cd else out["x"]   # use_mu_cd: 0.5μ + 0.5, not clipped
  return x_neg, eps_z, chain_energies, num_replayed


def train_step(state: EBMTrainState, batch: jax.Array, key: jax.Array, *, vae, vae_variables, ebm, tx,
               settings: StepSettings, mesh=None):
  """One contrastive-divergence update of ψ (§3.1); the NVAE is frozen and in eval-mode BN."""
  key = jax.random.fold_in(key, state.step)
  x_neg, eps_z, chain_energies, num_replayed = negatives(state, key, vae=vae, vae_variables=vae_variables, ebm=ebm,
                                                         settings=settings, batch_size=batch.shape[0], mesh=mesh)

  def loss_fn(params):
    e_pos, mutated = ebm.apply({"params": params}, batch, mutable=["normalized_weights"])
    e_neg = ebm.apply({"params": params}, x_neg)
    spectral, new_spectral = objectives.spectral_norm_penalty(mutated.get("normalized_weights", {}), state.spectral)
    loss = jnp.mean(e_pos) - jnp.mean(e_neg) + settings.alpha_s * spectral
    return loss, (new_spectral, {"energy_pos": jnp.mean(e_pos), "energy_neg": jnp.mean(e_neg),
                                 "energy_diff": jnp.mean(e_pos) - jnp.mean(e_neg), "spectral_norm": spectral})

  (loss, (new_spectral, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_params, new_opt_state = loop.update_if_finite(finite, tx, grads, state.params, state.opt_state)
  keep = lambda new, old: loop.keep_if_finite(finite, new, old)
  buffer = state.buffer
  if buffer is not None:
    buffer = sampling.push_replay_buffer(buffer, eps_z, keep=finite)
  new_state = EBMTrainState(state.step + 1, new_params, new_opt_state,
                            keep(new_spectral, state.spectral), buffer)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, chain_energy_first=jnp.mean(chain_energies[0]),
                 chain_energy_last=jnp.mean(chain_energies[-1]), num_replayed=num_replayed.astype(jnp.float32),
                 skipped=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


# ---------------------------------------------------------------------------------------------- loop


def _check_compatible(config, vae_config):
  if config.langevin.get("space", "eps") == "pixel" and config.buffer.use:
    raise WorkdirError("the replay buffer holds ε_z, which pixel-space chains (langevin.space='pixel') do not "
                       "have: set --config.buffer.use=False")
  if config.data.name != vae_config.data.name:
    raise WorkdirError(f"the stage-1 NVAE in {config.vae_workdir} was trained on {vae_config.data.name!r} but this "
                       f"config trains the EBM on {config.data.name!r}; point --config.vae_workdir at a "
                       f"{config.data.name} NVAE")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> EBMTrainState:
  """Trains the EBM of `config` in `workdir` on the NVAE of `config.vae_workdir`; resumes if possible."""
  vae, vae_variables, vae_config, stage1 = workdir_lib.load_stage1_of(workdir, config)
  _check_compatible(config, vae_config)
  run = loop.start(config, workdir)
  if jax.process_index() == 0:
    workdir_lib.write_stage1_record(workdir, stage1)
  mesh, repl, sharded = run.mesh, run.replicated, run.data_sharded
  vae_variables = jax.device_put(interface.decoder_variables(vae, vae_variables), repl)   # stage 2 only decodes

  train_ds = data.create_dataset(
      config.data.name, "train", image_size=vae.image_shape[0], image_channels=vae.image_shape[-1],
      global_batch_size=config.train.batch_size, seed=config.seed, train=True, random_flip=config.data.random_flip,
      data_dir=config.data.data_dir, process_index=jax.process_index(), process_count=jax.process_count())

  ebm = create_ebm(config)
  tx = create_optimizer(config)
  init_key, train_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
  init_batches = config.ebm.data_init_batches
  # data-dependent init on `data_init_batches` real batches (5 × 32 = 160 images in the reference)
  init_images = np.concatenate([train_ds.batches[i] for i in range(init_batches if config.ebm.data_init else 1)])
  # Statistics of the global init batch (all processes' shares), as the reference averages them over GPUs.
  capacity = config.buffer.capacity if config.buffer.use else 0   # per device, as the reference's per GPU

  shardings = functools.partial(state_shardings, mesh=mesh)
  state = run.checkpointer.restore_or_initialize(
      functools.partial(create_train_state, ebm, vae, tx, buffer_capacity=capacity, buffer_shards=mesh.size),
      init_key, run.shard(init_images), sharding=shardings)
  state_sharding = shardings(state)
  logging.info("EBM: %d parameters; NVAE from %s step %d",
               sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)), stage1["path"], stage1["step"])

  def make_step(lr_scale):
    tx = create_optimizer(config, lr_scale)
    p_train_step = jax.jit(
        lambda state, batch, key, vv: train_step(state, batch, key, vae=vae, vae_variables=vv, ebm=ebm, tx=tx,
                                                 settings=StepSettings.of(config), mesh=mesh),
        in_shardings=(state_sharding, sharded, repl, repl), out_shardings=(state_sharding, repl), donate_argnums=0,
        compiler_options=parallel.compiler_options_for(vae))
    return lambda state, batch: p_train_step(state, batch, train_key, vae_variables)

  num = config.train.num_image_samples
  p_sample = jax.jit(functools.partial(sampling.sample_fn, vae=vae, ebm=ebm, num_samples=num, mesh=mesh,
                                       **sampling_settings(config)),
                     compiler_options=parallel.compiler_options_for(vae))
  p_vae_sample = jax.jit(lambda v, k: sampling.vae_samples(k, v, vae=vae, num_samples=num,
                                                            temperature=config.langevin.temperature, mesh=mesh))

  def write_images(state, step):
    if len(vae.image_shape) != 3:           # 2-D points: no image grids
      return
    params = {"vae": vae_variables, "ebm": {"params": state.params}}
    loop.write_images(run.writer, workdir, step, {"vae_samples": p_vae_sample(vae_variables, sample_key),
                                                  "vaebm_samples": p_sample(sample_key, params)})

  return loop.run(state, make_step, train_ds.iterate, run, total_steps=config.train.num_train_steps, name="EBM",
                  actions=[(config.train.image_every_steps, write_images)])


def train_both_stages(config: ml_collections.ConfigDict, workdir: str) -> str:
  """A two-stage config (configs/*_vaebm.py): the NVAE in `<workdir>/vae`, the EBM on it in
  `<workdir>/ebm`, then `config.ebm.sample` VAEBM samples; returns the samples' folder."""
  from vaebm_jax import evaluate, train_vae
  vae_dir, ebm_dir = os.path.join(workdir, "vae"), os.path.join(workdir, "ebm")
  train_vae.train_and_evaluate(config.vae, vae_dir)
  ebm_config = config.ebm.copy_and_resolve_references()
  ebm_config.vae_workdir = vae_dir
  train_and_evaluate(ebm_config, ebm_dir)
  out = evaluate.sample_to_files(ebm_dir, ebm_config.sample.num_samples, ebm_config.sample.batch_size)
  logging.info("VAE sample grids in %s/images, VAEBM samples in %s", vae_dir, out)
  return out
