"""Stage 2: train the energy network on top of a frozen stage-1 NVAE (VAEBM_SPEC.md §3).

`train_and_evaluate(config, workdir)`: positives from data, negatives from short ε-space Langevin
chains (fresh or from the replay buffer), loss E⁺ − E⁻ + α_s·SR, IGEBM clip, Adam(0.99, 0.999).
`load_vaebm(workdir)` restores everything `sampling.sample_fn` needs.
"""

from __future__ import annotations

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
from clu import metric_writers, periodic_actions

from vaebm_jax import checkpoint, data, objectives, optim, parallel, sampling, train_vae, visualize
from vaebm_jax.models import nvae
from vaebm_jax.models.energy import EnergyNet
from vaebm_jax.models.mlp import MLPEnergy
from vaebm_jax.train_vae import due


class WorkdirError(RuntimeError):
  """A stage-1 or stage-2 workdir is missing or does not fit; the message says what to do."""


@flax.struct.dataclass
class EBMTrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  spectral: Any                         # power-iteration u, v per weight shape
  buffer: Optional[sampling.ReplayBuffer]


# ---------------------------------------------------------------------------------------------- models


def load_vae(vae_workdir: Optional[str], scan_groups: Optional[bool] = None):
  """Restores the stage-1 NVAE: (module, {'params', 'batch_stats'}, its config).

  `scan_groups=False` returns the NVAE with separate modules per latent group and its variables
  unstacked (`nvae.unstack_groups`): what stage 2 uses by default, as Langevin steps run faster.
  """
  if not vae_workdir:
    raise WorkdirError("config.vae_workdir is not set: pass --config.vae_workdir=W, the workdir of a stage-1 run "
                       "(python -m vaebm_jax.main --config=configs/<dataset>_vae.py --workdir=W)")
  ckpt_dir = os.path.join(vae_workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise WorkdirError(f"no stage-1 checkpoints in {ckpt_dir}: train the NVAE first with --mode=train_vae "
                       f"--workdir={vae_workdir}")
  ckpt = checkpoint.Checkpointer(vae_workdir, max_to_keep=None)
  if ckpt.latest_step() is None:
    raise WorkdirError(f"{ckpt_dir} holds no finished checkpoint: let the stage-1 run save one "
                       f"(train.checkpoint_every_steps) and try again")
  vae_config = ckpt.restore_config()
  if vae_config.get("stage") != "vae":
    raise WorkdirError(f"{vae_workdir} is not a stage-1 (NVAE) workdir (stage {vae_config.get('stage')!r})")
  model = train_vae.create_model(vae_config)
  if getattr(model, "decoder", "normal") != "normal":
    raise WorkdirError(f"the NVAE in {vae_workdir} uses the {model.decoder!r} decoder; VAEBM needs the Gaussian "
                       f"decoder (model.decoder='normal'), the only one with an ε_x path")
  tx, _ = train_vae.create_optimizer(vae_config, 1, 1)
  target = jax.eval_shape(functools.partial(train_vae.create_train_state, model, tx, image_shape=model.image_shape),
                          jax.random.key(0))
  state = ckpt.restore(target)
  ckpt.close()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  if scan_groups is not None and isinstance(model, nvae.NVAE) and scan_groups != model.scan_groups:
    if scan_groups:
      raise WorkdirError(f"the NVAE in {vae_workdir} was trained with model.scan_groups=False; run stage 2 with "
                         f"--config.vae_scan_groups=False")
    model, variables = model.clone(scan_groups=False), nvae.unstack_groups(variables)
  return model, variables, vae_config


def create_ebm(config: ml_collections.ConfigDict, data_init: Optional[bool] = None):
  """The energy network: a conv ResNet of VAEBM_SPEC.md §4, or an MLP (`architecture='mlp'`, for 2-D data,
  `n_channel` hidden units)."""
  e = config.ebm
  if e.architecture == "mlp":
    return MLPEnergy(e.n_channel, e.get("num_layers", 3))
  return EnergyNet(e.architecture, e.n_channel, e.data_init if data_init is None else data_init, e.conv_impl)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  t = config.train
  return optim.ebm_optimizer(t.learning_rate, t.weight_decay, clip=t.grad_clip)


def create_train_state(ebm: EnergyNet, vae: nvae.NVAE, tx, key: jax.Array, init_images: jax.Array,
                       config: ml_collections.ConfigDict) -> EBMTrainState:
  """Initialises the EBM on real images (data-dependent init when enabled: Linen's init runs the real
  forward pass), the optimiser, the power-iteration state and an empty replay buffer."""
  k_params, k_sr = jax.random.split(key)
  variables = ebm.init(k_params, init_images)
  spectral = objectives.init_spectral_state(k_sr, variables.get("normalized_weights", {}), num_iter=40)
  buffer = sampling.init_replay_buffer(vae, config.buffer.size) if config.buffer.use else None
  return EBMTrainState(jnp.zeros((), jnp.int32), variables["params"], tx.init(variables["params"]), spectral, buffer)


# ---------------------------------------------------------------------------------------------- step


def negatives(state: EBMTrainState, key: jax.Array, *, vae, vae_variables, ebm, config, batch_size: int,
              mesh=None):
  """Short-run Langevin from fresh noise (or the buffer); returns x⁻ and chain diagnostics.

  `langevin.space='eps'` is VAEBM (§3.1); 'pixel' runs the chain on x with U = E(x) from
  `langevin.pixel_init` (VAE samples: the paper's x-space ablation; 'noise': a short-run EBM).
  """
  lv = config.langevin
  k_init, k_buffer, k_chain = jax.random.split(key, 3)
  params = {"vae": vae_variables, "ebm": {"params": jax.lax.stop_gradient(state.params)}}
  if lv.get("space", "eps") == "pixel":
    x = sampling.initial_pixels(k_init, params, vae=vae, num_samples=batch_size, init=lv.pixel_init,
                                temperature=lv.temperature, mesh=mesh)
    x, chain_energies, _ = sampling.langevin_chain(
        x, k_chain, lambda x: sampling.pixel_potential_fn(x, params, ebm=ebm), num_steps=lv.train_steps,
        step_size=lv.step_size, unroll=lv.unroll, noise_scale=lv.get("noise_scale", 1.0))
    return jax.lax.stop_gradient(x), None, chain_energies, jnp.zeros((), jnp.int32)
  eps_z, eps_x = sampling.initial_noise(k_init, vae, batch_size, mesh)
  num_replayed = jnp.zeros((), jnp.int32)
  if state.buffer is not None:
    probability = sampling.replay_probability(state.step, config.buffer.p_max, config.buffer.anneal_steps)
    eps_z, num_replayed = sampling.sample_initial_eps_z(state.buffer, k_buffer, eps_z, probability)
  potential = lambda e: sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm, potential=lv.potential,
                                              temperature=lv.temperature)
  (eps_z, eps_x), chain_energies, _ = sampling.langevin_chain(
      (eps_z, eps_x), k_chain, potential, num_steps=lv.train_steps, step_size=lv.step_size, unroll=lv.unroll,
      noise_scale=lv.get("noise_scale", 1.0))
  eps_z, eps_x = jax.lax.stop_gradient((eps_z, eps_x))
  out = vae.decode_from_eps(vae_variables, eps_z, eps_x, lv.temperature)
  x_neg = out["mean"] if config.train.use_mu_cd else out["x"]   # use_mu_cd: 0.5μ + 0.5, not clipped
  return x_neg, eps_z, chain_energies, num_replayed


def train_step(state: EBMTrainState, batch: jax.Array, key: jax.Array, *, vae, vae_variables, ebm, tx, config,
               mesh=None):
  """One contrastive-divergence update of ψ (§3.1); the NVAE is frozen and in eval-mode BN."""
  key = jax.random.fold_in(key, state.step)
  x_neg, eps_z, chain_energies, num_replayed = negatives(state, key, vae=vae, vae_variables=vae_variables, ebm=ebm,
                                                         config=config, batch_size=batch.shape[0], mesh=mesh)

  def loss_fn(params):
    e_pos, mutated = ebm.apply({"params": params}, batch, mutable=["normalized_weights"])
    e_neg = ebm.apply({"params": params}, x_neg)
    spectral, new_spectral = objectives.spectral_norm_penalty(mutated.get("normalized_weights", {}), state.spectral)
    loss = jnp.mean(e_pos) - jnp.mean(e_neg) + config.train.alpha_s * spectral
    return loss, (new_spectral, {"energy_pos": jnp.mean(e_pos), "energy_neg": jnp.mean(e_neg),
                                 "energy_diff": jnp.mean(e_pos) - jnp.mean(e_neg), "spectral_norm": spectral})

  (loss, (new_spectral, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  buffer = state.buffer
  if buffer is not None:
    buffer = keep(sampling.push_replay_buffer(buffer, eps_z), buffer)
  new_state = EBMTrainState(state.step + 1, keep(new_params, state.params), keep(new_opt_state, state.opt_state),
                            keep(new_spectral, state.spectral), buffer)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, chain_energy_first=chain_energies[0],
                 chain_energy_last=chain_energies[-1], num_replayed=num_replayed.astype(jnp.float32),
                 skipped=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


# ---------------------------------------------------------------------------------------------- loop


def sampling_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keyword arguments of `sampling.sample_fn` that a stage-2 config fixes (test-time chain)."""
  lv = config.langevin
  return dict(num_steps=lv.test_steps, step_size=lv.step_size, potential=lv.potential,
              temperature=lv.temperature, unroll=lv.unroll, space=lv.get("space", "eps"),
              pixel_init=lv.get("pixel_init", "vae_mean"), noise_scale=lv.get("noise_scale", 1.0))


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
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)
  vae, vae_variables, vae_config = load_vae(config.vae_workdir, config.get("vae_scan_groups"))
  _check_compatible(config, vae_config)
  repl, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  vae_variables = jax.device_put(vae_variables, repl)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  train_ds = data.create_dataset(
      config.data.name, "train", image_size=vae.image_shape[0], image_channels=vae.image_shape[-1],
      global_batch_size=config.train.batch_size, seed=config.seed, train=True, random_flip=config.data.random_flip,
      data_dir=config.data.data_dir, process_index=jax.process_index(), process_count=jax.process_count())

  ebm = create_ebm(config)
  tx = create_optimizer(config)
  root = jax.random.key(config.seed)
  init_key, train_key, sample_key = jax.random.split(root, 3)
  init_batches = config.ebm.data_init_batches
  # data-dependent init on `data_init_batches` real batches (5 × 32 = 160 images in the reference)
  init_images = np.concatenate([train_ds.batches[i] for i in range(init_batches if config.ebm.data_init else 1)])
  ckpt = checkpoint.Checkpointer(workdir, config.train.keep_checkpoints)
  # Statistics of the global init batch (all processes' shares), as the reference averages them over GPUs.
  state = ckpt.restore_or_initialize(functools.partial(create_train_state, ebm, vae, tx, config=config), init_key,
                                     parallel.shard_batch(init_images, mesh), sharding=repl)
  state_sharding = jax.tree.map(lambda _: repl, state)
  logging.info("EBM: %d parameters; NVAE from %s", sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
               config.vae_workdir)
  writer.write_hparams(train_vae.flatten_config(config))

  p_train_step = jax.jit(
      lambda state, batch, key, vv: train_step(state, batch, key, vae=vae, vae_variables=vv, ebm=ebm, tx=tx,
                                               config=config, mesh=mesh),
      in_shardings=(state_sharding, sharded, repl, repl), out_shardings=(state_sharding, repl), donate_argnums=0)
  step_fn = lambda state, batch, key: p_train_step(state, batch, key, vae_variables)
  num = config.train.num_image_samples
  p_sample = jax.jit(functools.partial(sampling.sample_fn, vae=vae, ebm=ebm, num_samples=num, mesh=mesh,
                                       **sampling_settings(config)))
  p_vae_sample = jax.jit(lambda v, k: sampling.vae_samples(k, v, vae=vae, num_samples=num,
                                                            temperature=config.langevin.temperature, mesh=mesh))

  def write_images(state, step):
    if len(vae.image_shape) != 3:           # 2-D points: no image grids
      return
    params = {"vae": vae_variables, "ebm": {"params": state.params}}
    grids = {"vae_samples": visualize.make_grid(np.asarray(p_vae_sample(vae_variables, sample_key))),
             "vaebm_samples": visualize.make_grid(np.asarray(p_sample(sample_key, params)))}
    for name, grid in grids.items():
      visualize.save_png(grid, os.path.join(workdir, "images", f"{name}_{step:07d}.png"))
    writer.write_images(step, {name: grid[None] for name, grid in grids.items()})

  start_step, total = int(state.step), config.train.num_train_steps
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
  hooks = [report] if jax.process_index() == 0 else []
  logging.info("Training EBM steps %d → %d on %d devices", start_step, total, mesh.size)
  history = []
  batches = train_ds.iterate(start_step)
  for step in range(start_step + 1, total + 1):
    state, metrics = step_fn(state, parallel.shard_batch(next(batches), mesh), train_key)
    history.append(metrics)
    for hook in hooks:
      hook(step)
    if due(step, config.train.log_every_steps, total):
      writer.write_scalars(step, train_vae.aggregate_metrics(history))
      history = []
    if due(step, config.train.image_every_steps, total):
      write_images(state, step)
    if due(step, config.train.checkpoint_every_steps, total):
      ckpt.save(step, state, config)
  ckpt.close()
  writer.flush()
  return state


def load_vaebm(workdir: str, step: Optional[int] = None):
  """Restores (vae, ebm, params, settings) from a stage-2 workdir for `sampling.sample_fn`.

  Example:
    vae, ebm, params, settings = load_vaebm("workdirs/cifar10_ebm")
    images = jax.jit(functools.partial(sample_fn, vae=vae, ebm=ebm, num_samples=16, **settings))(key, params)
  """
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise WorkdirError(f"no stage-2 checkpoints in {workdir}/checkpoints: train the EBM first with "
                       f"--mode=train_ebm --workdir={workdir}")
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=None)
  if ckpt.latest_step() is None:
    raise WorkdirError(f"{workdir}/checkpoints holds no finished checkpoint")
  config = ckpt.restore_config(step)
  if config.get("stage") != "ebm":
    raise WorkdirError(f"{workdir} is not a stage-2 (EBM) workdir (stage {config.get('stage')!r})")
  vae, vae_variables, _ = load_vae(config.vae_workdir, config.get("vae_scan_groups"))
  ebm = create_ebm(config, data_init=False)
  tx = create_optimizer(config)
  shape = (2,) + tuple(vae.image_shape)
  target = jax.eval_shape(functools.partial(create_train_state, ebm, vae, tx, config=config), jax.random.key(0),
                          jax.ShapeDtypeStruct(shape, jnp.float32))
  state = ckpt.restore(target, step)
  ckpt.close()
  params = {"vae": vae_variables, "ebm": {"params": state.params}}
  return vae, ebm, params, sampling_settings(config)
