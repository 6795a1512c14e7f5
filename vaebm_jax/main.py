"""Entry point: `python -m vaebm_jax.main --config=configs/X.py --workdir=W --mode=MODE`.

All logic lives in importable libraries (train_vae, evaluate, ...); this file parses flags, sets up
devices, and dispatches. Modes: train_vae, train_ebm, sample, eval, summary, vaebm.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10_vae.py[:smoke].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and images.")
flags.DEFINE_enum("mode", None, ["train_vae", "train_ebm", "sample", "eval", "summary", "vaebm"],
                  "What to run; default: train_vae for stage-1 configs, train_ebm for stage-2 configs, vaebm "
                  "(both stages, then samples) for configs/*_vaebm.py.")
flags.mark_flags_as_required(["config"])


def _setup_devices(cpu_devices: int) -> None:
  """Before JAX starts: on CPU, `cpu_devices` simulated devices (0 = one per core)."""
  import jax
  if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu") and "xla_force_host_platform_device_count" not in \
      os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", cpu_devices or os.cpu_count() or 1)
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID") or \
      os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()


def _quiet_orbax() -> None:
  """Orbax logs every checkpoint step at INFO; keep its warnings only."""
  import logging as std_logging

  class Filter(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname

  for handler in std_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(Filter())


def main(argv):
  _quiet_orbax()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  _setup_devices(config.get("cpu_devices", 0))
  import jax
  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  mode = FLAGS.mode or {"vae": "train_vae", "ebm": "train_ebm", "vaebm": "vaebm"}[config.stage]
  from vaebm_jax import workdir as workdir_lib
  workdir_lib.check_config(config)      # bad choices: one line, before anything is written

  if mode == "summary":
    from vaebm_jax import evaluate
    if config.stage == "vaebm":
      print(evaluate.parameter_summary(config.vae) + "\n" + evaluate.parameter_summary(config.ebm))
    else:
      print(evaluate.parameter_summary(config))
    return
  if FLAGS.workdir is None:
    raise app.UsageError(f"--workdir is required for --mode={mode}")
  if mode == "vaebm":
    if config.stage != "vaebm":
      raise app.UsageError("--mode=vaebm needs a two-stage config (configs/*_vaebm.py)")
    from vaebm_jax import train_ebm
    train_ebm.train_both_stages(config, FLAGS.workdir)
  elif mode == "train_vae":
    if config.stage != "vae":
      raise app.UsageError(f"--mode=train_vae needs a stage-1 config (configs/*_vae.py), got stage {config.stage!r}")
    from vaebm_jax import train_vae
    train_vae.train_and_evaluate(config, FLAGS.workdir)
  elif mode == "train_ebm":
    if config.stage != "ebm":
      raise app.UsageError(f"--mode=train_ebm needs a stage-2 config (configs/*_ebm.py), got stage {config.stage!r}")
    from vaebm_jax import train_ebm
    train_ebm.train_and_evaluate(config, FLAGS.workdir)
  elif mode == "sample":
    from vaebm_jax import evaluate
    if config.stage != "ebm":
      raise app.UsageError("--mode=sample draws VAEBM samples: give a stage-2 config (configs/*_ebm.py)")
    out = evaluate.sample_to_files(FLAGS.workdir, config.sample.num_samples, config.sample.batch_size, config.seed,
                                   step=config.sample.step, normalize=config.sample.normalize)
    logging.info("samples in %s", out)
  elif mode == "eval":
    from vaebm_jax import evaluate
    if "eval" not in config:
      raise app.UsageError("--mode=eval needs a stage-1 or stage-2 config (it reads config.eval)")
    evaluate.evaluate(FLAGS.workdir, config.eval, config.eval.step, data_dir=config.data.data_dir)


OUT_OF_MEMORY_HINT = ("lower --config.train.batch_size (or --config.sample.batch_size / --config.eval.batch_size "
                      "when sampling or evaluating); the NVAE's cells can be rematerialised with "
                      "--config.model.remat_cells=True (stage 1) or --config.vae_remat_cells=True (stage 2); "
                      "on CPU, fewer simulated devices "
                      "(--config.cpu_devices=1) keep one copy of the model instead of several")


def _config_error(argv: list[str], error: Exception) -> str:
  """One line for a --config / --config.<field> flag that does not parse or names no field."""
  if isinstance(error, flags.Error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] + (f" {lines[-1]}" if len(lines) > 1 else "")
  if isinstance(error, OSError):       # the config file does not load
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"cannot load the --config file: {lines[-1]}"
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if spec is not None:
    import importlib.util
    path, _, arg = spec.partition(":")
    try:
      module_spec = importlib.util.spec_from_file_location("_vaebm_config", path)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
      config = module.get_config(arg) if arg else module.get_config()
      for a in argv[1:]:
        if a.startswith("--config.") and "=" in a:
          field = a[len("--config."):].split("=", 1)[0]
          node = config
          for part in field.split("."):
            if not hasattr(node, "keys") or part not in node:
              known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
              return f"--config.{field}: {path} has no field {part!r} there; known: {known}"
            node = node[part]
    except Exception:   # noqa: BLE001 — fall back to the parser's own message
      pass
  return f"bad --config flag ({type(error).__name__}: {error})"


def run():
  from vaebm_jax.errors import ONE_LINE_ERRORS, Preempted
  app.define_help_flags()
  try:   # parse up front so that a bad config flag is one line, not a traceback
    remaining = FLAGS(sys.argv)
    if FLAGS.config is not None:   # ml_collections defers a config file's load errors to the first access
      FLAGS.config.get("stage")
  except Exception as e:   # noqa: BLE001 — flags.Error, or what ml_collections raises for an unknown field
    print(f"error: {_config_error(sys.argv, e)}", file=sys.stderr)
    sys.exit(2)
  try:
    app.run(main, flags_parser=lambda argv: remaining)
  except Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(143 if e.signal_name == "SIGTERM" else 130)
  except ONE_LINE_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except RuntimeError as e:      # jax.errors.JaxRuntimeError: XLA's out-of-memory
    if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
      raise
    print(f"error: out of memory ({str(e).splitlines()[0][:160]}): {OUT_OF_MEMORY_HINT}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  # As a command only (not when `run` is called in a process of your own): restart once with XLA's per-step
  # buffers on huge pages, before JAX loads (vaebm_jax/hostenv.py).
  from vaebm_jax import hostenv
  hostenv.reexec_with_huge_pages()
  run()
