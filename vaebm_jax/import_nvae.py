"""Official NVAE `checkpoint.pt` → stage-1 workdir: `python -m vaebm_jax.import_nvae CHECKPOINT.pt WORKDIR`.

The file is what NVlabs/NVAE's train.py saves (and VAEBM's README links for CIFAR-10 and CelebA-HQ 256):
a `torch.save` dict `{'epoch', 'state_dict', 'optimizer', 'global_step', 'args', 'arch_instance',
'scheduler', 'grad_scalar'}` with `args` the argparse.Namespace of train.py. It is read without torch
(`torch_pickle`); the architecture comes from `args` (VAEBM_SPEC.md §5.9), the weights through
`torch_import.nvae_variables_from_torch` with every tensor checked against the model. The workdir gets
`checkpoints/<global_step>/{state, config}`, a full `VAETrainState` (fresh optimiser moments, the
learning-rate schedule at `global_step`) beside a stage-1 config, so stage 2
(`--config.vae_workdir=WORKDIR`) uses it and stage 1 could resume from it, and `nvae_import.json`
(where it came from). What VAEBM cannot use (the discretized-logistic-mixture or Bernoulli decoder,
which have no ε_x path), a flag this importer does not know, an architecture or dataset this package
does not implement, or a workdir that already holds checkpoints is a `CheckpointImportError`; the
command prints it as one line `error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from configs import default_vae
from vaebm_jax import checkpoint, torch_pickle
from vaebm_jax.models import layers, nvae, torch_import

IMPORT_RECORD = "nvae_import.json"

# NVAE's `args.dataset` → (our data.name, image size, channels). The others of NVAE's train.py either
# have no input pipeline here (imagenet_32, ffhq, lsun_bedroom_128, lsun_church_128, stacked_mnist) or
# use the Bernoulli decoder (mnist, omniglot).
DATASETS = {
    "cifar10": ("cifar10", 32, 3),
    "celeba_64": ("celeba64", 64, 3),
    "lsun_church_64": ("lsun_church64", 64, 3),
    "celeba_256": ("celebahq256", 256, 3),
}
# train.py flags that fix the architecture, passed to `NVAE` under the same name (VAEBM_SPEC.md §5).
_ARCH_INT_FLAGS = ("num_channels_enc", "num_channels_dec", "num_latent_scales", "num_groups_per_scale",
                   "num_latent_per_group", "min_groups_per_scale", "num_cell_per_cond_enc", "num_cell_per_cond_dec",
                   "num_preprocess_blocks", "num_preprocess_cells", "num_postprocess_blocks",
                   "num_postprocess_cells", "num_nf", "num_x_bits")
_ARCH_BOOL_FLAGS = ("ada_groups", "use_se", "res_dist")
# What checkpoints older than these flags were trained with (NVAE's evaluate.py assumes the same).
_OLD_DEFAULTS = {"ada_groups": False, "min_groups_per_scale": 1, "num_mixture_dec": 10}
# train.py optimisation flags → (config section, field); they shape a resumed stage-1 run, not the model.
_TRAINING_FLAGS = {
    "learning_rate": ("optim", "learning_rate"), "learning_rate_min": ("optim", "learning_rate_min"),
    "weight_decay": ("optim", "weight_decay"), "warmup_epochs": ("optim", "warmup_epochs"),
    "epochs": ("train", "epochs"), "weight_decay_norm": ("objective", "weight_decay_norm"),
    "weight_decay_norm_init": ("objective", "weight_decay_norm_init"),
    "weight_decay_norm_anneal": ("objective", "weight_decay_norm_anneal"),
    "kl_anneal_portion": ("objective", "kl_anneal_portion"), "kl_const_portion": ("objective", "kl_const_portion"),
    "kl_const_coeff": ("objective", "kl_const_coeff"),
}
# train.py flags (and attributes train.py / evaluate.py set on args) with no bearing on the model:
# paths, process layout, resumption, and fast_adamax (the same update as torch's Adamax, only faster).
# batch_size and seed are mapped separately.
_RUN_FLAGS = frozenset({"root", "save", "data", "cont_training", "num_proc_node", "node_rank", "local_rank",
                        "global_rank", "num_process_per_node", "master_address", "distributed", "num_total_iter",
                        "fid_dir", "fast_adamax", "batch_size", "seed"})
KNOWN_FLAGS = frozenset(_ARCH_INT_FLAGS + _ARCH_BOOL_FLAGS + ("arch_instance", "num_mixture_dec", "dataset")) | \
    frozenset(_TRAINING_FLAGS) | _RUN_FLAGS


class CheckpointImportError(ValueError):
  """The checkpoint cannot become a workdir of this package (or the workdir is taken); the message says why."""


# ---------------------------------------------------------------------------------------------- args


def _args_dict(args: Any) -> dict[str, Any]:
  if isinstance(args, argparse.Namespace):
    return dict(vars(args))
  if isinstance(args, Mapping):
    return dict(args)
  raise CheckpointImportError(f"checkpoint['args'] is a {type(args).__name__}, not NVAE train.py's "
                              f"argparse.Namespace")


def _typed(args: Mapping[str, Any], name: str, kind: Union[type, tuple[type, ...]]) -> Any:
  """`args[name]`, which must be of `kind` (bools are not ints here)."""
  value = args[name]
  if isinstance(value, np.generic):
    value = value.item()
  ok = isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)
  if not ok:
    what = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise CheckpointImportError(f"args.{name} = {value!r} is not a {what}")
  return value


def _check_arch_instance(name: str, cells: Any) -> None:
  """`arch_instance` must be one of ours, and the checkpoint's cell table (if saved) must agree with it."""
  if name not in layers.ARCH_CELLS:
    raise CheckpointImportError(f"args.arch_instance = {name!r} is not implemented here (known: "
                                f"{', '.join(sorted(layers.ARCH_CELLS))})")
  if cells is None:
    return
  if not isinstance(cells, Mapping):
    raise CheckpointImportError(f"checkpoint['arch_instance'] is a {type(cells).__name__}, not NVAE's cell table")
  ours = layers.ARCH_CELLS[name]
  saved = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cells.items()}
  if saved.get("ar_nn") in (("",), ()):   # the flows' cell type: unused by every instance NVAE defines
    del saved["ar_nn"]
  if saved != {k: tuple(v) for k, v in ours.items()}:
    diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != tuple(ours.get(k, ())))
    raise CheckpointImportError(f"checkpoint['arch_instance'] differs from the {name!r} cells of this package in "
                                f"{diff} (saved: {', '.join(f'{k}={list(saved.get(k, []))}' for k in diff)})")


def config_from_args(args: Any, arch_cells: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """The stage-1 config (`configs/default_vae.py` filled from NVAE train.py's `args`).

  Args:
    args: `checkpoint['args']`, NVAE train.py's argparse.Namespace (or a dict of its flags).
    arch_cells: `checkpoint['arch_instance']`, the cell table the run used; checked when given.
  Returns:
    A ConfigDict with `stage='vae'`, `data.name`, `model` (the `NVAE` constructor arguments), and the
    run's optimisation settings in `train`, `optim`, `objective` and `seed`.
  Raises:
    CheckpointImportError: an unknown flag, a missing or ill-typed architecture flag, a decoder other
    than the Gaussian one, a dataset or cell architecture this package does not implement.
  """
  args = _args_dict(args)
  unknown = sorted(set(args) - KNOWN_FLAGS)
  if unknown:
    raise CheckpointImportError(f"args has flags this importer does not know ({', '.join(unknown)}); it maps every "
                                f"flag of NVlabs/NVAE's train.py and refuses others, which may change the model")
  for name, value in _OLD_DEFAULTS.items():
    args.setdefault(name, value)
  missing = sorted(n for n in _ARCH_INT_FLAGS + _ARCH_BOOL_FLAGS + ("arch_instance", "dataset") if n not in args)
  if missing:
    raise CheckpointImportError(f"args lacks the architecture flags {', '.join(missing)}")

  dataset = _typed(args, "dataset", str)
  if dataset not in DATASETS:
    why = ("uses the Bernoulli decoder, which has no ε_x path for VAEBM" if dataset in ("mnist", "omniglot")
           else "has no input pipeline in this package")
    raise CheckpointImportError(f"args.dataset = {dataset!r} {why}; importable: {', '.join(DATASETS)}")
  num_mixture_dec = _typed(args, "num_mixture_dec", int)
  if num_mixture_dec != 1:
    raise CheckpointImportError(f"args.num_mixture_dec = {num_mixture_dec}: a discretized logistic mixture decoder; "
                                f"VAEBM needs NVAE's Gaussian decoder (num_mixture_dec = 1), the only one with an "
                                f"ε_x path")
  arch_instance = _typed(args, "arch_instance", str)
  _check_arch_instance(arch_instance, arch_cells)
  model = {name: _typed(args, name, int) for name in _ARCH_INT_FLAGS}
  model.update({name: _typed(args, name, bool) for name in _ARCH_BOOL_FLAGS})
  small = sorted(n for n, v in model.items() if isinstance(v, int) and not isinstance(v, bool)
                 and v < (0 if n == "num_nf" else 1))
  if small or not 1 <= model["num_x_bits"] <= 8:
    bad = small or ["num_x_bits"]
    raise CheckpointImportError(f"args has invalid values: {', '.join(f'{n}={model[n]}' for n in bad)}")

  config = default_vae.get_default_config()
  data_name, image_size, channels = DATASETS[dataset]
  config.data.name = data_name
  config.model.update(image_size=image_size, image_channels=channels, arch_instance=arch_instance,
                      decoder="normal", num_mixture_dec=1, **model)
  for flag, (section, field) in _TRAINING_FLAGS.items():
    if flag in args:
      kind = type(config[section][field])
      value = _typed(args, flag, (int, float) if kind is float else kind)
      config[section][field] = kind(value)
  if "seed" in args:
    config.seed = _typed(args, "seed", int)
  if "batch_size" in args:   # per GPU in train.py; ours is the global batch
    processes = [_typed(args, n, int) for n in ("num_process_per_node", "num_proc_node") if n in args]
    config.train.batch_size = _typed(args, "batch_size", int) * max(int(np.prod(processes)), 1)
  return config


# ---------------------------------------------------------------------------------------------- import


def _check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointImportError(f"{workdir} exists and is not a directory")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise CheckpointImportError(f"{workdir} already holds checkpoints ({ckpt_dir}); nothing is overwritten: "
                                f"choose a new or empty WORKDIR")


def _load(path_or_dict: Union[str, os.PathLike, Mapping[str, Any]]) -> Mapping[str, Any]:
  if isinstance(path_or_dict, Mapping):
    return path_or_dict
  try:
    loaded = torch_pickle.load(path_or_dict)
  except OSError as e:
    raise CheckpointImportError(f"cannot read {os.fspath(path_or_dict)}: {e.strerror or e}") from None
  except ValueError as e:
    raise CheckpointImportError(str(e)) from None
  if not isinstance(loaded, Mapping):
    raise CheckpointImportError(f"{os.fspath(path_or_dict)} holds a {type(loaded).__name__}, not an NVAE "
                                f"checkpoint dict")
  return loaded


def _one_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return "; ".join(lines[:6]) + (f"; ... ({len(lines) - 6} more)" if len(lines) > 6 else "")


def convert_checkpoint(checkpoint_dict: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, dict[str, Any], int]:
  """(stage-1 config, `{'params', 'batch_stats'}` as numpy arrays, global_step) of a loaded NVAE checkpoint.

  Raises:
    CheckpointImportError: see `config_from_args`; also a state_dict that does not fit the architecture
      of `args` (every tensor is checked: none missing, extra or mis-shaped).
  """
  for key in ("args", "state_dict"):
    if key not in checkpoint_dict:
      raise CheckpointImportError(f"not an NVAE train.py checkpoint: no {key!r} entry (has "
                                  f"{', '.join(sorted(map(str, checkpoint_dict)))})")
  config = config_from_args(checkpoint_dict["args"], checkpoint_dict.get("arch_instance"))
  step = checkpoint_dict.get("global_step", 0)
  step = step.item() if isinstance(step, np.generic) else step
  if not isinstance(step, int) or isinstance(step, bool) or step < 0:
    raise CheckpointImportError(f"checkpoint['global_step'] = {step!r} is not a step number")
  state = checkpoint_dict["state_dict"]
  if not isinstance(state, Mapping):
    raise CheckpointImportError(f"checkpoint['state_dict'] is a {type(state).__name__}, not a state_dict")
  state = {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}

  model = nvae.NVAE(**config.model.to_dict())
  x = jax.ShapeDtypeStruct((1,) + model.image_shape, jnp.float32)
  try:
    shapes = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, x, True),
                            x)
  except ValueError as e:
    raise CheckpointImportError(f"args describe no buildable NVAE: {_one_line(e)}") from None
  try:
    variables = torch_import.nvae_variables_from_torch(state, model)
    torch_import.check_against(variables, shapes)
  except (ValueError, KeyError) as e:
    raise CheckpointImportError(f"the state_dict does not fit the NVAE of its args: {_one_line(e)}") from None
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  return config, variables, step


def _train_state(model: nvae.NVAE, config: ml_collections.ConfigDict, variables: dict[str, Any], step: int):
  """A full `VAETrainState` around the converted variables, shaped as `train_vae.create_train_state` makes one.

  Adamax moments start at zero, the learning-rate schedule at `step` (a resumed run continues NVAE's
  schedule). The spectral regulariser's power-iteration vectors u, v start as random unit vectors: NVAE
  keeps them out of its checkpoints too, and every training step refines them
  (`config.objective.num_power_iter` iterations); 40 iterations here would cost compiling the whole model.
  """
  from vaebm_jax import train_vae  # the training stack (TensorFlow, clu) only once the input is known good

  tx, _ = train_vae.create_optimizer(config, 1, 1)   # the schedule is not part of the state
  target = jax.eval_shape(functools.partial(train_vae.create_train_state, model, tx, image_shape=model.image_shape),
                          jax.random.key(0))
  params, batch_stats = jax.device_put((variables["params"], variables["batch_stats"]))
  opt_state = jax.jit(tx.init)(params)
  is_schedule = lambda path, _: any(getattr(k, "tuple_name", None) == "ScaleByScheduleState" for k in path)
  if any(is_schedule(path, v) for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")):
    opt_state = optax.tree_utils.tree_set(opt_state, is_schedule, count=jnp.asarray(step, jnp.int32))
  rng = np.random.default_rng(config.seed)

  def unit_vectors(shape: jax.ShapeDtypeStruct) -> np.ndarray:
    x = rng.standard_normal(shape.shape).astype(shape.dtype)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-3)

  spectral = jax.tree.map(unit_vectors, target.spectral)
  state = train_vae.VAETrainState(jnp.asarray(step, jnp.int32), params, batch_stats, opt_state, spectral)
  mismatch = jax.tree.structure(state) != jax.tree.structure(target) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True))
  if mismatch:   # a bug here, not a bad input: the checkpoint would not restore into create_train_state's shape
    raise AssertionError("the imported train state does not have the shape of train_vae.create_train_state's")
  return state


def import_checkpoint(checkpoint_path_or_dict: Union[str, os.PathLike, Mapping[str, Any]],
                      workdir: Union[str, os.PathLike]) -> int:
  """Writes an official NVAE checkpoint as a stage-1 workdir of this package.

  Args:
    checkpoint_path_or_dict: the `checkpoint.pt` of NVAE's train.py, or that file already loaded (e.g.
      by `torch_pickle.load`, or `torch.load`ed with tensors turned into numpy arrays).
    workdir: where to write; must not hold checkpoints yet.
  Returns:
    The step of the written checkpoint (the NVAE run's `global_step`).
  Raises:
    CheckpointImportError: the file is unreadable or not an NVAE checkpoint, VAEBM cannot use it (see
      `config_from_args`), its weights do not fit its args, or `workdir` already holds checkpoints.
  """
  return _import(checkpoint_path_or_dict, os.fspath(workdir))[0]


def _import(checkpoint_path_or_dict, workdir: str) -> tuple[int, ml_collections.ConfigDict]:
  _check_workdir(workdir)
  loaded = _load(checkpoint_path_or_dict)
  config, variables, step = convert_checkpoint(loaded)
  model = nvae.NVAE(**config.model.to_dict())
  state = _train_state(model, config, variables, step)

  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=None)
  ckpt.save(step, state, config)
  ckpt.close()
  source = None if isinstance(checkpoint_path_or_dict, Mapping) else os.path.abspath(checkpoint_path_or_dict)
  epoch = loaded.get("epoch")
  record = {"source": source, "epoch": epoch.item() if isinstance(epoch, np.generic) else epoch, "global_step": step,
            "args": {k: v for k, v in _args_dict(loaded["args"]).items()
                     if isinstance(v, (str, int, float, bool, type(None)))}}
  with open(os.path.join(workdir, IMPORT_RECORD), "w") as f:
    json.dump(record, f, indent=2, default=str)
  logging.info("Imported %s into %s at step %d", source or "an NVAE checkpoint", workdir, step)
  return step, config


# ---------------------------------------------------------------------------------------------- command


def main(argv: Optional[list[str]] = None) -> int:
  """The command line: `python -m vaebm_jax.import_nvae CHECKPOINT.pt WORKDIR`; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m vaebm_jax.import_nvae",
      description="Converts an official NVAE checkpoint.pt (NVlabs/NVAE train.py, Gaussian decoder) into a "
                  "stage-1 workdir for stage 2 (--config.vae_workdir=WORKDIR). Needs no PyTorch.")
  parser.add_argument("checkpoint", help="the checkpoint.pt of NVAE's train.py")
  parser.add_argument("workdir", help="the stage-1 workdir to write (new, or without checkpoints)")
  opts = parser.parse_args(argv)
  try:
    step, config = _import(opts.checkpoint, opts.workdir)
  except CheckpointImportError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  name = config.data.name
  print(f"wrote {os.path.join(os.path.abspath(opts.workdir), 'checkpoints', str(step))} (NVAE for {name}); "
        f"stage 2: python -m vaebm_jax.main --config=configs/{name}_ebm.py --config.vae_workdir={opts.workdir} "
        f"--workdir=WORKDIR_EBM")
  return 0


if __name__ == "__main__":
  sys.exit(main())
