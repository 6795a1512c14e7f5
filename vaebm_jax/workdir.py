"""Reading and checking stage-1 and stage-2 workdirs: below the training loops, above the models.

A workdir is what a stage loop writes: `<W>/checkpoints/<step>/{state, config}` (orbax) plus, for
stage 2, `<W>/stage1.json`, the record of the exact stage-1 checkpoint its energy network was trained
on (resolved path, step and a fingerprint of the NVAE's architecture). Loading restores parameters and
BatchNorm statistics only, never the optimiser state, power-iteration vectors or the replay buffer,
and imports no training code (no TensorFlow, no clu):

  from vaebm_jax import load_vaebm, sample_fn
  vae, ebm, params, settings = load_vaebm("workdirs/cifar10_ebm")      # or step=N
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from vaebm_jax import checkpoint
from vaebm_jax.errors import ConfigValueError, WorkdirError  # noqa: F401  (also re-exported from here)
from vaebm_jax.models import layers, mlp, nvae
from vaebm_jax.models.energy import EnergyNet

STAGE1_RECORD = "stage1.json"

# config.model_type → the VAE class built from config.model (both implement the ELBO path and
# models.interface.LikelihoodVAE).
VAE_MODELS = {"nvae": nvae.NVAE, "mlp_vae": mlp.MLPVAE}



# ---------------------------------------------------------------------------------------------- models


_CONV_CHOICES = {"conv_impl": layers.CONV_IMPLS, "conv_dtype": layers.CONV_DTYPES, "vae_conv_dtype": layers.CONV_DTYPES}


def check_conv_settings(section: ml_collections.ConfigDict, prefix: str,
                        keys: tuple[str, ...] = ("conv_impl", "conv_dtype")) -> None:
  """Raises ConfigValueError (one line on the command line) for a convolution setting outside its choices."""
  for key in keys:
    if key in section and section[key] not in _CONV_CHOICES[key]:
      raise ConfigValueError(f"--config.{prefix}{key}={section[key]}: must be one of {', '.join(_CONV_CHOICES[key])}")


def check_config(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """The choices of a stage-1, stage-2 or two-stage config's convolution settings, checked by `main` before a
  run writes anything (ConfigValueError, one line). Modules built in code of your own check the same values
  themselves (`models.layers.conv_mode`: a ValueError when they are set up). One warning where a
  stage asks for bf16 convolutions on a CPU (both stages of a two-stage config: still one)."""
  if _check_stage_config(config, prefix) and jax.default_backend() == "cpu":
    logging.warning("conv_dtype bfloat16 is meant for GPUs and TPUs: XLA:CPU emulates bf16 convolutions, many "
                    "times slower than float32")


def _check_stage_config(config: ml_collections.ConfigDict, prefix: str) -> bool:
  """Raises for a bad choice; returns whether any network of `config` has bf16 convolutions."""
  stage = config.get("stage")
  if stage == "vaebm":
    uses_vae = _check_stage_config(config.vae, prefix + "vae.")
    return _check_stage_config(config.ebm, prefix + "ebm.") or uses_vae
  if stage == "vae" and config.get("model_type", "nvae") == "nvae":
    check_conv_settings(config.model, prefix + "model.")
  elif stage == "ebm":
    check_conv_settings(config, prefix, keys=("vae_conv_dtype",))
    if config.ebm.architecture != "mlp":
      check_conv_settings(config.ebm, prefix + "ebm.")
  dtypes = [config.get("model", {}).get("conv_dtype"), config.get("vae_conv_dtype"),
            config.get("ebm", {}).get("conv_dtype")]
  return "bfloat16" in dtypes


def create_vae(config: ml_collections.ConfigDict):
  """The VAE of a stage-1 config: `VAE_MODELS[config.model_type](**config.model)` (NVAE by default)."""
  model_type = config.get("model_type", "nvae")
  if model_type not in VAE_MODELS:
    raise WorkdirError(f"model_type must be one of {sorted(VAE_MODELS)}, got {model_type!r}")
  return VAE_MODELS[model_type](**config.model.to_dict())


def create_ebm(config: ml_collections.ConfigDict, data_init: Optional[bool] = None):
  """The energy network of a stage-2 config: a conv ResNet of VAEBM_SPEC.md §4, or an MLP
  (`architecture='mlp'`, for 2-D data, `n_channel` hidden units)."""
  e = config.ebm
  if e.architecture == "mlp":
    return mlp.MLPEnergy(e.n_channel, e.get("num_layers", 3))
  return EnergyNet(e.architecture, e.n_channel, e.data_init if data_init is None else data_init, e.conv_impl,
                   conv_dtype=e.get("conv_dtype", "float32"))


def sampling_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keyword arguments of `sampling.sample_fn` that a stage-2 config fixes (the test-time chain)."""
  lv = config.langevin
  return dict(num_steps=lv.test_steps, step_size=lv.step_size, potential=lv.potential,
              temperature=lv.temperature, unroll=lv.unroll, space=lv.get("space", "eps"),
              pixel_init=lv.get("pixel_init", "vae_mean"), noise_scale=lv.get("noise_scale", 1.0))


def architecture_fingerprint(config: ml_collections.ConfigDict) -> str:
  """A short hash of a stage-1 config's model type and constructor arguments."""
  blob = json.dumps({"model_type": config.get("model_type", "nvae"), "model": config.model.to_dict()},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- reading


def _open(workdir: str, what: str, hint: str) -> checkpoint.Checkpointer:
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise WorkdirError(f"no {what} checkpoints in {os.path.join(workdir, 'checkpoints')}: {hint}")
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=None, read_only=True)
  if ckpt.latest_step() is None:
    raise WorkdirError(f"{os.path.join(workdir, 'checkpoints')} holds no finished checkpoint: let the run save "
                       f"one (train.checkpoint_every_steps) and try again")
  return ckpt


def _check_step(ckpt: checkpoint.Checkpointer, step: Optional[int], workdir: str) -> int:
  steps = ckpt.all_steps()
  if step is None:
    return steps[-1]
  if step not in steps:
    raise WorkdirError(f"{workdir} has no checkpoint at step {step}; it has steps {steps}")
  return step


def read_config(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, int]:
  """(the config saved with checkpoint `step` of any workdir, that step); default the latest."""
  ckpt = _open(workdir, "", "not a workdir of this package (nothing trained there yet?)")
  step = _check_step(ckpt, step, workdir)
  config = ckpt.restore_config(step)
  ckpt.close()
  return config, step


def _restore_params(ckpt: checkpoint.Checkpointer, step: int, target: dict, workdir: str) -> dict:
  """Restores only the items of `target` (e.g. params and batch_stats) from the state of `step`."""
  try:
    return ckpt.restore_items(step, target)
  except (ValueError, KeyError, TypeError) as e:
    raise WorkdirError(f"the checkpoint {workdir} step {step} does not fit the architecture in its own config "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def load_vae(vae_workdir: Optional[str], step: Optional[int] = None, scan_groups: Optional[bool] = None):
  """Restores a stage-1 VAE: (module, {'params', 'batch_stats'}, its config, the step restored).

  `step`: the checkpoint (default the latest). `scan_groups=False` returns the NVAE with separate
  modules per latent group and its variables unstacked (`nvae.unstack_groups`): what stage 2 uses by
  default, as Langevin steps run faster.
  """
  if not vae_workdir:
    raise WorkdirError("config.vae_workdir is not set: pass --config.vae_workdir=W, the workdir of a stage-1 run "
                       "(python -m vaebm_jax.main --config=configs/<dataset>_vae.py --workdir=W)")
  ckpt = _open(vae_workdir, "stage-1", f"train the NVAE first with --mode=train_vae --workdir={vae_workdir}, or "
               f"convert an official NVAE checkpoint with python -m vaebm_jax.import_nvae CHECKPOINT.pt {vae_workdir}")
  step = _check_step(ckpt, step, vae_workdir)
  vae_config = ckpt.restore_config(step)
  if vae_config.get("stage") != "vae":
    ckpt.close()
    raise WorkdirError(f"{vae_workdir} is not a stage-1 (NVAE) workdir (stage {vae_config.get('stage')!r})")
  model = create_vae(vae_config)
  if getattr(model, "decoder", "normal") != "normal":
    ckpt.close()
    raise WorkdirError(f"the NVAE in {vae_workdir} uses the {model.decoder!r} decoder; VAEBM needs the Gaussian "
                       f"decoder (model.decoder='normal'), the only one with an ε_x path")
  x = jax.ShapeDtypeStruct((2,) + tuple(model.image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, x, True),
                          x)
  target = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
  if not target["batch_stats"]:
    target = {"params": target["params"]}
  variables = _restore_params(ckpt, step, target, vae_workdir)
  ckpt.close()
  variables.setdefault("batch_stats", {})
  if scan_groups is not None and isinstance(model, nvae.NVAE) and scan_groups != model.scan_groups:
    if scan_groups:
      raise WorkdirError(f"the NVAE in {vae_workdir} was trained with model.scan_groups=False; run stage 2 with "
                         f"--config.vae_scan_groups=False")
    model, variables = model.clone(scan_groups=False), nvae.unstack_groups(variables)
  return model, variables, vae_config, step


# ---------------------------------------------------------------------------------------------- stage 2


def stage1_record(vae_workdir: str, step: int, vae_config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {"path": os.path.abspath(vae_workdir), "step": int(step),
          "fingerprint": architecture_fingerprint(vae_config)}


def write_stage1_record(workdir: str, record: dict[str, Any]) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, STAGE1_RECORD + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(workdir, STAGE1_RECORD))


def read_stage1_record(workdir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(workdir, STAGE1_RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def stage2_vae(vae, config: ml_collections.ConfigDict):
  """The NVAE as stage 2 runs it: whole cells rematerialised exactly when `config.vae_remat_cells` is set,
  convolutions with `config.vae_conv_dtype` operands (float32 by default).

  Stage 2 decides, whatever stage 1 trained with: on CPU, remat speeds up stage 1's scanned groups but
  slows the Langevin gradient through the unscanned NVAE, so stage 2 uses it for memory only, and then
  recomputes whole cells (experiments/RESULTS.md, issue 10). Same parameters and results."""
  if not isinstance(vae, nvae.NVAE):
    return vae
  return vae.clone(remat_cells=bool(config.get("vae_remat_cells")), remat_keep_convs=False,
                   conv_dtype=config.get("vae_conv_dtype", "float32"))


def load_stage1_of(workdir: str, config: ml_collections.ConfigDict):
  """`_load_stage1_of`, its NVAE as `stage2_vae` sets it up."""
  vae, variables, vae_config, record = _load_stage1_of(workdir, config)
  return stage2_vae(vae, config), variables, vae_config, record


def _load_stage1_of(workdir: str, config: ml_collections.ConfigDict):
  """The stage-1 VAE that the stage-2 run in `workdir` was (or will be) trained on.

  A run that has started uses exactly the checkpoint of its `stage1.json` (path, step and architecture
  fingerprint are checked); a new run takes the latest checkpoint of `config.vae_workdir` (recorded by
  the caller with `write_stage1_record`). Workdirs written before the record existed fall back to the
  latest checkpoint of `config.vae_workdir`, with a warning.
  Returns (vae, variables, vae_config, record).
  """
  record = read_stage1_record(workdir)
  scan = config.get("vae_scan_groups")
  if record is not None and not os.path.isabs(record["path"]):    # relative to this workdir (shipped models)
    record = dict(record, path=os.path.normpath(os.path.join(os.path.abspath(workdir), record["path"])))
  if record is None:
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
      logging.warning("%s has no %s (written before stage 2 recorded its NVAE): using the latest checkpoint of %s",
                      workdir, STAGE1_RECORD, config.vae_workdir)
    vae, variables, vae_config, step = load_vae(config.vae_workdir, None, scan)
    return vae, variables, vae_config, stage1_record(config.vae_workdir, step, vae_config)
  path = record["path"]
  if config.get("vae_workdir") and os.path.isdir(path) and os.path.isdir(config.vae_workdir) and \
      os.path.realpath(config.vae_workdir) != os.path.realpath(path):
    logging.warning("%s was trained on the NVAE in %s (step %d); using it, not config.vae_workdir=%s",
                    workdir, path, record["step"], config.vae_workdir)
  if not os.path.isdir(path) and config.get("vae_workdir") and os.path.isdir(config.vae_workdir):
    path = config.vae_workdir    # the stage-1 workdir moved together with this one
  if not os.path.isdir(path):
    raise WorkdirError(f"{workdir} was trained on the NVAE in {record['path']} (step {record['step']}), which is "
                       f"gone: restore it there or pass --config.vae_workdir=W of a copy")
  vae, variables, vae_config, step = load_vae(path, record["step"], scan)
  if architecture_fingerprint(vae_config) != record["fingerprint"]:
    raise WorkdirError(f"the NVAE in {path} step {step} is not the one {workdir} was trained on (architecture "
                       f"fingerprint {architecture_fingerprint(vae_config)} ≠ {record['fingerprint']}); point "
                       f"--config.vae_workdir at the original stage-1 workdir")
  return vae, variables, vae_config, dict(record, path=os.path.abspath(path))


def load_vaebm(workdir: str, step: Optional[int] = None):
  """Restores (vae, ebm, params, settings) from a stage-2 workdir for `sampling.sample_fn`.

  `step`: the stage-2 checkpoint (default the latest; e.g. one from before a run diverged). The VAE is
  the exact stage-1 checkpoint the run recorded. Only parameters and BN statistics are read.

  Example:
    vae, ebm, params, settings = load_vaebm("workdirs/cifar10_ebm")
    images = jax.jit(functools.partial(sample_fn, vae=vae, ebm=ebm, num_samples=16, **settings))(key, params)
  """
  ckpt = _open(workdir, "stage-2", f"train the EBM first with --mode=train_ebm --workdir={workdir}")
  step = _check_step(ckpt, step, workdir)
  config = ckpt.restore_config(step)
  if config.get("stage") != "ebm":
    ckpt.close()
    raise WorkdirError(f"{workdir} is not a stage-2 (EBM) workdir (stage {config.get('stage')!r})")
  vae, vae_variables, _, _ = load_stage1_of(workdir, config)
  ebm = create_ebm(config, data_init=False)
  x = jax.ShapeDtypeStruct((2,) + tuple(vae.image_shape), jnp.float32)
  target = {"params": jax.eval_shape(lambda x: ebm.init(jax.random.key(0), x), x)["params"]}
  ebm_params = _restore_params(ckpt, step, target, workdir)
  ckpt.close()
  return vae, ebm, {"vae": vae_variables, "ebm": ebm_params}, sampling_settings(config)


PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def pretrained(name: str) -> str:
  """The stage-2 workdir of a model shipped with the package (`vaebm_jax/pretrained/<name>/ebm`), for
  `load_vaebm(pretrained(name))` or `--mode=sample --workdir=...`."""
  available = sorted(os.listdir(PRETRAINED)) if os.path.isdir(PRETRAINED) else []
  if name not in available:
    raise WorkdirError(f"no shipped model {name!r}; available: {available}")
  return os.path.join(PRETRAINED, name, "ebm")


def export_for_sampling(workdir: str, out: str, step: Optional[int] = None) -> str:
  """Writes a stage-2 run's sampling parts to `out`: `out/vae` (its stage-1 checkpoint: parameters and BN
  statistics) and `out/ebm` (checkpoint `step`, default the latest: parameters), each with its config, and
  a stage-1 record relative to `out/ebm`. No optimiser, power-iteration or buffer state: small enough
  to ship, loads with `load_vaebm(out + '/ebm')` and `--mode=sample`, cannot resume training."""
  config, step = read_config(workdir, step)
  if config.get("stage") != "ebm":
    raise WorkdirError(f"{workdir} is not a stage-2 (EBM) workdir (stage {config.get('stage')!r})")
  _, _, params, _ = load_vaebm(workdir, step)
  _, _, vae_config, record = load_stage1_of(workdir, config)
  _, raw_vae, _, _ = load_vae(record["path"], record["step"])        # as saved (not unstacked)
  raw_vae = {k: v for k, v in raw_vae.items() if v}                   # the MLP VAE has no BN statistics
  config = config.copy_and_resolve_references()
  config.vae_workdir = None                                           # the record below says where the VAE is
  for sub, variables, cfg, at in (("vae", raw_vae, vae_config, record["step"]), ("ebm", params["ebm"], config, step)):
    path = os.path.join(out, sub)
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.listdir(os.path.join(path, "checkpoints")):
      raise WorkdirError(f"{path} already holds checkpoints: export into an empty directory")
    ckpt = checkpoint.Checkpointer(path, max_to_keep=None)
    ckpt.save(at, jax.device_get(dict(variables)), cfg)
    ckpt.close()
  write_stage1_record(os.path.join(out, "ebm"), dict(record, path=os.path.join("..", "vae")))
  return os.path.join(out, "ebm")


__all__ = ["PRETRAINED", "STAGE1_RECORD", "VAE_MODELS", "WorkdirError", "architecture_fingerprint", "create_ebm",
           "create_vae", "export_for_sampling", "load_stage1_of", "load_vae", "load_vaebm", "pretrained",
           "read_config", "read_stage1_record", "sampling_settings", "stage1_record", "write_stage1_record"]
