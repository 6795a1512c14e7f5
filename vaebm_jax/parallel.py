"""Data parallelism with jit + NamedSharding over a 1-D ('data',) mesh of all devices.

Parameters and optimiser state are replicated; batches and chains are sharded along 'data'.
Multi-host runs call `jax.distributed.initialize()` first (main.py) and use the same code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def compiler_options(remat: bool) -> Optional[dict]:
  """Options for `jax.jit(..., compiler_options=...)` of a program that rematerialises cells.

  XLA:CPU removes the optimisation barriers that `jax.checkpoint` (`nn.remat`) puts around the
  recomputation early in its pipeline (pass `cse_barrier_expander`); a later CSE then merges the
  recomputation with the forward pass, or the scheduler hoists it there, and the activations are kept
  after all: remat lowered no temporaries (ten decoder cells at batch 8: 642 → 644 MB). Keeping the
  barriers (the pass disabled for that program only) gives 125 MB, with the same gradients. Only on
  CPU, where this was measured; None otherwise.
  """
  if remat and jax.default_backend() == "cpu":
    return {"xla_disable_hlo_passes": "cse_barrier_expander"}
  return None


def compiler_options_for(model) -> Optional[dict]:
  """`compiler_options` for a program that runs `model`: an NVAE says whether its cells rematerialise
  (`remat_mode`); other models do not."""
  remat_mode = getattr(model, "remat_mode", None)
  return compiler_options(remat_mode is not None and remat_mode() != "off")


def create_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  if batch_size % mesh.size:
    suggestion = mesh.size * max(1, batch_size // mesh.size)
    raise ValueError(f"batch size {batch_size} is not divisible by the {mesh.size} devices; choose a multiple "
                     f"of {mesh.size} (e.g. --config.train.batch_size={suggestion})")


def shard_batch(local_batch: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """Assembles the global batch from this process's share, sharded along 'data'."""
  return jax.make_array_from_process_local_data(data_sharded(mesh), np.asarray(local_batch))


def sync(name: str) -> None:
  """A barrier across processes (no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
