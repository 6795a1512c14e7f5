"""VAEBM sampling in the VAE's reparameterised noise space (VAEBM_SPEC.md §1.3, §1.4, §2, §3.3).

Pure functions: the potentials U(ε), one Langevin update, a `jax.lax.scan` chain, the public
`sample_fn`, and a replay buffer of ε_z kept on device. Everything runs on any VAE that implements
`models.interface.ReparameterizedVAE` (the NVAE, the MLP VAE, or one of your own).

Pixel space (`space='pixel'`): the same chain on x with U(x) = E(x) alone, started at the VAE's
samples (the paper's "Langevin in x-space" ablation, §7.2) or at uniform noise (a plain short-run
EBM); a baseline, not VAEBM.

Langevin update (§2): ε ← ε − (η/2)·∇_ε U(ε) + √η·ξ over ε_z and ε_x jointly, with the VAE in
eval-mode BN and both networks frozen; the gradient is that of Σ_b U(ε_b) w.r.t. ε only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vaebm_jax import parallel
from vaebm_jax.models.interface import ReparameterizedVAE, check_vae

POTENTIALS = ("code", "paper")
# Matmul/conv precision of everything that computes a log-density (the potentials, the decoder of the
# final sample). On TPU and recent GPUs XLA's default uses bf16/TF32 passes, which changes log p(z),
# log p(x|z) and E(x) beyond the size of a Langevin step (VAEBM_SPEC.md §9.6); CPU is float32 anyway.
PRECISION = "float32"
SPACES = ("eps", "pixel")
PIXEL_INITS = ("vae_mean", "vae_sample", "noise")


def potential_fn(eps_z: Sequence[jax.Array], eps_x: jax.Array, params: Any, *, vae: ReparameterizedVAE,
                 ebm: nn.Module, potential: str = "code", temperature: float = 1.0):
  """U(ε) per sample, and the energy E(x) of the decoded image.

  potential='code' (default, the reference implementation's): U = E(x) − log p(z) − log p(x|z), with
    x = (clip(μ_x + σ_x ε_x, −1, 1) + 1)/2 and p(x|z) using the floored σ' (§1.4).
  potential='paper': U = E(T(ε)) + ½‖ε‖² over all of ε_z and ε_x.

  Returns:
    (U, E), each of shape (B,).
  """
  if potential not in POTENTIALS:
    raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
  with jax.default_matmul_precision(PRECISION):
    out = vae.decode_from_eps(params["vae"], eps_z, eps_x, temperature)
    energy = ebm.apply(params["ebm"], out["x"])
  if potential == "code":
    return energy - out["log_p_z"] - out["log_p_x_given_z"], energy
  sq = sum(jnp.sum(jnp.square(e).reshape(e.shape[0], -1), axis=1) for e in list(eps_z) + [eps_x])
  return energy + 0.5 * sq, energy


def langevin_step(eps, key: jax.Array, grad_fn: Callable, step_size: float, noise_scale: float = 1.0,
                  noise_rows: Optional[int] = None):
  """One update ε ← ε − (η/2)∇U + c·√η ξ for a pytree ε (c = `noise_scale`, 1 for Langevin dynamics);
  `grad_fn(ε) → (∇ Σ U, aux)`. `noise_rows`: draw ξ for the first rows only and pad with zeros (the
  padding rows of `sample_fn`, so that a chain's noise does not depend on the padded batch)."""
  grads, aux = grad_fn(eps)
  leaves, treedef = jax.tree.flatten(eps)
  keys = jax.random.split(key, len(leaves))

  def draw(k, x):
    rows = x.shape[0] if noise_rows is None else noise_rows
    xi = jax.random.normal(k, (rows,) + x.shape[1:], x.dtype)
    return xi if rows == x.shape[0] else _pad_rows(xi, x.shape[0])

  noise = jax.tree.unflatten(treedef, [draw(k, x) for k, x in zip(keys, leaves, strict=True)])
  new = jax.tree.map(lambda e, g, n: e - 0.5 * step_size * g + noise_scale * jnp.sqrt(step_size) * n, eps, grads,
                     noise)
  return new, aux


def langevin_chain(eps, key: jax.Array, potential: Callable, *, num_steps: int, step_size: float,
                   unroll: int | bool = 1, noise_scale: float = 1.0, noise_rows: Optional[int] = None):
  """Runs `num_steps` Langevin updates as one `jax.lax.scan`.

  Args:
    eps: pytree of chain states (each leaf batched on axis 0).
    potential: ε → (U per sample, aux per sample).
    unroll: passed to lax.scan (True unrolls fully; on CPU with the fast conv path it gained nothing,
      experiments/RESULTS.md).
    noise_scale: multiplies the √η noise (1 = Langevin dynamics; short-run EBMs often use less).
    noise_rows: see `langevin_step`.
  U and its gradient are computed at float32 matmul precision (`PRECISION`).
  Returns:
    (final ε, U per step and sample (num_steps, B), aux per step (num_steps, B)); step k's values are
    those of the state the k-th update starts from.
  """
  def summed(e):
    u, aux = potential(e)
    return jnp.sum(u), (u, aux)

  def grad_fn(e):
    with jax.default_matmul_precision(PRECISION):    # the backward pass is traced here, not in `potential`
      (_, per_sample), grads = jax.value_and_grad(summed, has_aux=True)(e)
    return grads, per_sample

  def body(e, k):
    return langevin_step(e, k, grad_fn, step_size, noise_scale, noise_rows)

  final, (energies, aux) = jax.lax.scan(body, eps, jax.random.split(key, num_steps), unroll=unroll)
  return final, energies, aux


def _shard(x: jax.Array, mesh: Optional[jax.sharding.Mesh]) -> jax.Array:
  """Shards axis 0 over the mesh's 'data' axis when it divides evenly (a no-op on one device)."""
  if mesh is None or mesh.size == 1 or x.shape[0] % mesh.size:
    return x
  spec = jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def _auto_axes(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """The same devices and axis names with Auto axis types (`jax.make_mesh` defaults to Explicit), which is
  how parameters are placed by `load_vaebm` and how the chain is sharded here."""
  if all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types):
    return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * mesh.devices.ndim)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  """x with zero rows appended along axis 0 up to `rows`."""
  return jnp.concatenate([x, jnp.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)]) if rows > x.shape[0] else x


def default_mesh() -> jax.sharding.Mesh:
  return parallel.create_mesh()


def latent_noise(key: jax.Array, vae: ReparameterizedVAE, num_samples: int) -> list[jax.Array]:
  """Standard-normal ε_z for every latent group of `vae`, top group first."""
  shapes = vae.latent_shapes()
  keys = jax.random.split(key, len(shapes))
  return [jax.random.normal(k, (num_samples,) + tuple(shape)) for k, shape in zip(keys, shapes, strict=True)]


def initial_noise(key: jax.Array, vae: ReparameterizedVAE, num_samples: int,
                  mesh: Optional[jax.sharding.Mesh] = None):
  """Fresh ε_z (one array per latent group, top first) and ε_x ~ N(0, I), sharded over `mesh`."""
  k_z, k_x = jax.random.split(key)
  eps_z = [_shard(e, mesh) for e in latent_noise(k_z, vae, num_samples)]
  eps_x = _shard(jax.random.normal(k_x, (num_samples,) + tuple(vae.image_shape)), mesh)
  return eps_z, eps_x


def vae_samples(key: jax.Array, vae_variables: Any, *, vae: ReparameterizedVAE, num_samples: int,
                temperature: float = 1.0, use_mean: bool = True, mesh: Optional[jax.sharding.Mesh] = None):
  """Ancestral samples of the VAE alone: T_θ(ε) for fresh ε; the decoder mean (§1.5) or the sample x."""
  eps_z, eps_x = initial_noise(key, vae, num_samples, mesh)
  out = vae.decode_from_eps(vae_variables, eps_z, eps_x, temperature)
  return out["mean"] if use_mean else out["x"]


def initial_pixels(key: jax.Array, params: Any, *, vae: ReparameterizedVAE, num_samples: int, init: str,
                   temperature: float = 1.0, mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """Start of a pixel-space chain: the VAE's decoder mean (clipped to [0, 1] for images), its sample
  x, or uniform noise on [0, 1]."""
  if init == "noise":
    return _shard(jax.random.uniform(key, (num_samples,) + tuple(vae.image_shape)), mesh)
  if init not in PIXEL_INITS:
    raise ValueError(f"pixel_init must be one of {PIXEL_INITS}, got {init!r}")
  x = vae_samples(key, params["vae"], vae=vae, num_samples=num_samples, temperature=temperature,
                  use_mean=init == "vae_mean", mesh=mesh)
  return jnp.clip(x, 0.0, 1.0) if len(vae.image_shape) == 3 else x


def pixel_potential_fn(x: jax.Array, params: Any, *, ebm: nn.Module):
  """U(x) = E(x) per sample (the EBM alone, in pixel space), and E as the aux output."""
  with jax.default_matmul_precision(PRECISION):
    energy = ebm.apply(params["ebm"], x)
  return energy, energy


def sample_fn(key: jax.Array, params: Any, *, vae: ReparameterizedVAE, ebm: nn.Module, num_samples: int,
              num_steps: int, step_size: float, potential: str = "code", temperature: float = 1.0,
              unroll: int | bool = 1, clip: bool = True, return_eps: bool = False,
              return_energies: bool = False, mesh: Optional[jax.sharding.Mesh] = None, space: str = "eps",
              pixel_init: str = "vae_mean", noise_scale: float = 1.0, init=None):
  """Draws VAEBM samples: ε-space Langevin from N(0, I) (or from `init`), then the decoder mean (§1.5).

  A pure function of (key, params); `vae` and `ebm` are static modules, so wrap it as
  `jax.jit(functools.partial(sample_fn, vae=..., ebm=..., num_samples=..., num_steps=..., step_size=...))`.
  The chains are split across all devices of `mesh`: a `num_samples` that does not divide by the device
  count is padded with extra chains that are dropped at the end. A key gives the same samples whatever
  the number of devices. The log-densities run at float32 matmul precision (`PRECISION`). With networks of
  `conv_dtype='bfloat16'` (accelerators) the chain's convolutions take bf16 operands, and the returned
  images are decoded with float32 convolutions.

  Args:
    key: PRNG key.
    params: {'vae': VAE variables (NVAE: params, batch_stats), 'ebm': energy-net variables}.
    vae: any `models.interface.ReparameterizedVAE` (an `NVAE` module, an `MLPVAE`, ...).
    num_samples: number of chains (any positive number).
    num_steps, step_size: Langevin steps K and η (§2 table; η/2 multiplies ∇U, √η the noise).
    potential: 'code' (default) or 'paper' (§1.4).
    temperature: prior temperature t (VAEBM uses 1).
    unroll: lax.scan unroll of the chain.
    clip: clip image outputs to [0, 1] (the reference instead min-max rescales each image when saving;
      `evaluate.to_unit_range` does either). Ignored for non-image data.
    return_eps: also return the final chain state: `eps_z` (list, top group first) and `eps_x` (ε-space),
      or `x` (pixel space) — pass it back as `init` to continue the chains.
    return_energies: also return `energies`, U of every sample at the start of every step
      (num_steps, num_samples), and `ebm_energies`, E(x) at the same points.
    mesh: 1-D ('data',) mesh to split the samples over; default: all devices.
    space: 'eps' (VAEBM) or 'pixel' (baselines: Langevin on x with U = E(x); returns the final x).
    pixel_init: start of a pixel-space chain, 'vae_mean', 'vae_sample' or 'noise' (uniform on [0, 1]).
    noise_scale: multiplies the √η noise (1 = Langevin dynamics).
    init: optional start of the chains instead of fresh noise: `(eps_z, eps_x)` in ε-space (eps_z one
      array per latent group, as returned with `return_eps`), the images x in pixel space; batch
      `num_samples`.
  Returns:
    images (num_samples, *vae.image_shape) (in [0, 1] for images), plus the requested extras in a dict.
  """
  vae = check_vae(vae)
  if space not in SPACES:
    raise ValueError(f"space must be one of {SPACES}, got {space!r}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be positive, got {num_samples}")
  mesh = default_mesh() if mesh is None else _auto_axes(mesh)
  rows = -(-num_samples // mesh.size) * mesh.size           # padded to a multiple of the devices
  prepare = lambda x: _shard(_pad_rows(x, rows), mesh)
  k_init, k_chain = jax.random.split(key)
  chain = functools.partial(langevin_chain, key=k_chain, num_steps=num_steps, step_size=step_size, unroll=unroll,
                            noise_scale=noise_scale, noise_rows=num_samples)
  extras = {}
  if space == "eps":
    if init is None:
      eps_z, eps_x = initial_noise(k_init, vae, num_samples)
    else:
      eps_z, eps_x = _check_init_eps(init, vae, num_samples)
    eps = (list(map(prepare, eps_z)), prepare(eps_x))
    potential_of = lambda e: potential_fn(e[0], e[1], params, vae=vae, ebm=ebm, potential=potential,
                                          temperature=temperature)
    (eps_z, eps_x), energies, ebm_energies = chain(eps, potential=potential_of)
    with jax.default_matmul_precision(PRECISION):
      images = _float32_convs(vae).decode_from_eps(params["vae"], eps_z, eps_x, temperature)["mean"][:num_samples]
    if return_eps:
      extras["eps_z"], extras["eps_x"] = [e[:num_samples] for e in eps_z], eps_x[:num_samples]
  else:
    if init is None:
      x = initial_pixels(k_init, params, vae=vae, num_samples=num_samples, init=pixel_init, temperature=temperature)
    else:
      x = _check_init_pixels(init, vae, num_samples)
    x, energies, ebm_energies = chain(prepare(x), potential=lambda x: pixel_potential_fn(x, params, ebm=ebm))
    images = x[:num_samples]
    if return_eps:
      extras["x"] = images
  if clip and len(vae.image_shape) == 3:
    images = jnp.clip(images, 0.0, 1.0)
  if return_energies:
    extras["energies"], extras["ebm_energies"] = energies[:, :num_samples], ebm_energies[:, :num_samples]
  return (images, extras) if (return_eps or return_energies) else images


def _float32_convs(vae: ReparameterizedVAE) -> ReparameterizedVAE:
  """The VAE with float32 convolutions: the final decode of `sample_fn`. With `conv_dtype='bfloat16'` the
  chain's steps (nearly all the time) run in bf16, but the images it returns are decoded in float32, so
  that they carry no bf16 rounding of their own (0.2 of a grey level on average, up to 2.1, on the
  bundled stacked-digits model; experiments/gpu_precision.py, RESULTS.md)."""
  if getattr(vae, "conv_dtype", "float32") == "float32" or not hasattr(vae, "clone"):
    return vae
  return vae.clone(conv_dtype="float32")


def _check_init_eps(init, vae: ReparameterizedVAE, num_samples: int):
  try:
    eps_z, eps_x = init
    eps_z = list(eps_z)
  except (TypeError, ValueError):
    raise ValueError("init must be (eps_z, eps_x) in ε-space: eps_z a list with one array per latent group (top "
                     "first), as sample_fn returns with return_eps=True") from None
  want = [(num_samples,) + tuple(s) for s in vae.latent_shapes()]
  got = [tuple(e.shape) for e in eps_z]
  if got != want or tuple(eps_x.shape) != (num_samples,) + tuple(vae.image_shape):
    raise ValueError(f"init does not fit num_samples={num_samples} and this VAE: eps_z shapes {got} (want {want}), "
                     f"eps_x {tuple(eps_x.shape)} (want {(num_samples,) + tuple(vae.image_shape)})")
  return eps_z, eps_x


def _check_init_pixels(init, vae: ReparameterizedVAE, num_samples: int):
  want = (num_samples,) + tuple(vae.image_shape)
  if not hasattr(init, "shape") or tuple(init.shape) != want:
    raise ValueError(f"init must be images of shape {want} for a pixel-space chain, got "
                     f"{getattr(init, 'shape', type(init).__name__)}")
  return init


# ----------------------------------------------------------------------------------------------
# Replay buffer of ε_z (§3.3): FIFO ring on device, linear probability anneal. ε_x is never stored.
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class ReplayBuffer:
  """One FIFO ring of ε_z per data shard (device), as the reference keeps one buffer per GPU process:
  each shard pushes its own chains' final ε_z and replays from its own entries. Arrays carry the shard
  axis first (`eps_z[g]`: (shards, capacity, H, W, C); `size`, `pointer`: (shards,)), so sharding axis 0
  over 'data' puts each shard's buffer on its own device and no buffer entry crosses devices."""
  eps_z: list          # per latent group: (shards, capacity, H, W, C)
  size: jax.Array      # (shards,) filled entries
  pointer: jax.Array   # (shards,) next slot to write (the oldest entry once full)

  @property
  def capacity(self) -> int:
    """Entries per shard."""
    return self.eps_z[0].shape[1]

  @property
  def num_shards(self) -> int:
    return self.eps_z[0].shape[0]


def init_replay_buffer(vae: ReparameterizedVAE, capacity: int, num_shards: int = 1) -> ReplayBuffer:
  """An empty buffer of `capacity` entries per shard (`num_shards`: the devices of the data axis)."""
  return ReplayBuffer([jnp.zeros((num_shards, capacity) + tuple(s), jnp.float32) for s in vae.latent_shapes()],
                      jnp.zeros((num_shards,), jnp.int32), jnp.zeros((num_shards,), jnp.int32))


def replay_probability(step, p_max: float, anneal_steps: int):
  """p = min(p_max, p_max · step / anneal_steps)."""
  return jnp.minimum(p_max, p_max * step / max(anneal_steps, 1))


def _per_shard(x: jax.Array, shards: int) -> jax.Array:
  """(B, ...) sharded over 'data' → (shards, B / shards, ...): each device's rows become its shard."""
  if x.shape[0] % shards:
    raise ValueError(f"the batch of {x.shape[0]} does not split over the buffer's {shards} shards")
  return x.reshape((shards, x.shape[0] // shards) + x.shape[1:])


def _sample_one_shard(eps_z, size, key, fresh, probability):
  batch, capacity = fresh[0].shape[0], eps_z[0].shape[0]
  k_slots, k_pick = jax.random.split(key)
  wanted = jnp.sum(jax.random.bernoulli(k_slots, probability, (batch,)))
  num_replayed = jnp.minimum(wanted, size)
  scores = jnp.where(jnp.arange(capacity) < size, jax.random.uniform(k_pick, (capacity,)), jnp.inf)
  picked = jnp.argsort(scores)[:batch] if capacity >= batch else \
      jnp.concatenate([jnp.argsort(scores), jnp.zeros(batch - capacity, jnp.int32)])
  use_buffer = jnp.arange(batch) < num_replayed
  out = [jnp.where(use_buffer.reshape((-1,) + (1,) * (f.ndim - 1)), b[picked], f)
         for b, f in zip(eps_z, fresh, strict=True)]
  return out, num_replayed


def sample_initial_eps_z(buffer: ReplayBuffer, key: jax.Array, fresh: Sequence[jax.Array], probability):
  """Per shard, each of its batch slots comes from the shard's buffer with probability p (drawn uniformly
  without replacement from its filled entries); replayed samples come first in each shard's rows, fresh
  N(0, I) fill the rest. `fresh` is the global batch (rows split over the shards in order).

  Returns (ε_z per group, number replayed over all shards).
  """
  shards = buffer.num_shards
  per_shard = [_per_shard(f, shards) for f in fresh]
  eps_z, replayed = jax.vmap(_sample_one_shard, in_axes=(0, 0, 0, 0, None))(
      buffer.eps_z, buffer.size, jax.random.split(key, shards), per_shard, probability)
  return [e.reshape(f.shape) for e, f in zip(eps_z, fresh, strict=True)], jnp.sum(replayed)


def _push_one_shard(eps_z, size, pointer, new, keep):
  batch, capacity = new[0].shape[0], eps_z[0].shape[0]
  slots = (pointer + jnp.arange(batch)) % capacity
  # When not `keep`, the slots get their own rows back: a scatter in place, not a select over the buffer.
  rows = [jnp.where(keep, e, b[slots]) for b, e in zip(eps_z, new, strict=True)]
  return ([b.at[slots].set(r) for b, r in zip(eps_z, rows, strict=True)],
          jnp.where(keep, jnp.minimum(size + batch, capacity), size), jnp.where(keep, (pointer + batch) % capacity,
                                                                              pointer))


def push_replay_buffer(buffer: ReplayBuffer, eps_z: Sequence[jax.Array], keep=True) -> ReplayBuffer:
  """Appends the final ε_z of the global batch, each shard its own rows; beyond a shard's capacity its
  oldest entries are overwritten. With `keep` false (a skipped update) the buffer stays as it was, without
  a second copy of it (as `jnp.where(keep, pushed, buffer)` would make)."""
  shards = buffer.num_shards
  new, size, pointer = jax.vmap(_push_one_shard, in_axes=(0, 0, 0, 0, None))(
      buffer.eps_z, buffer.size, buffer.pointer, [_per_shard(e, shards) for e in eps_z], keep)
  return ReplayBuffer(new, size, pointer)


def buffer_shardings(buffer: ReplayBuffer, mesh: jax.sharding.Mesh) -> ReplayBuffer:
  """Shard axis over the mesh's data axis (a replicated buffer would hold every shard on every device)."""
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
  return jax.tree.map(lambda _: sharded, buffer)


__all__ = ["PIXEL_INITS", "POTENTIALS", "SPACES", "ReplayBuffer", "init_replay_buffer", "initial_noise",
           "initial_pixels", "langevin_chain", "langevin_step", "latent_noise", "pixel_potential_fn",
           "potential_fn", "push_replay_buffer", "buffer_shardings", "replay_probability", "sample_fn",
           "sample_initial_eps_z", "vae_samples"]
