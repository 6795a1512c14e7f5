"""Importing an official NVAE checkpoint.pt: the workdir reproduces the official outputs, bad input is refused."""

import argparse
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from tests.helpers import assert_elbo_matches_golden, golden, nchw_to_nhwc, restore_stage1
from vaebm_jax import import_nvae, torch_pickle
from vaebm_jax.models import nvae

pytestmark = pytest.mark.slow   # converts the reference checkpoint through the CLI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "..", "shared", "reference", "nvae_small_checkpoint.pt")


def _require_checkpoint():
  if not os.path.exists(CHECKPOINT):
    pytest.skip("official NVAE checkpoint ../shared/reference/nvae_small_checkpoint.pt not present")


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vaebm_jax.import_nvae", *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def loaded():
  _require_checkpoint()
  return torch_pickle.load(CHECKPOINT)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """The checkpoint converted once by the command line; (workdir, its output, restored config, model, state)."""
  _require_checkpoint()
  workdir = tmp_path_factory.mktemp("import_nvae") / "cifar10_vae"
  proc = _cli(CHECKPOINT, workdir)
  assert proc.returncode == 0, proc.stderr
  return (workdir, proc) + restore_stage1(workdir)


def _with_args(loaded, drop=(), **changes):
  """A shallow copy of the loaded checkpoint with its args changed."""
  args = argparse.Namespace(**vars(loaded["args"]))
  for name in drop:
    delattr(args, name)
  for name, value in changes.items():
    setattr(args, name, value)
  return dict(loaded, args=args)


def test_command_writes_a_stage1_workdir_at_the_checkpoints_step(imported, loaded):
  workdir, proc, config, model, state = imported
  assert "configs/cifar10_ebm.py" in proc.stdout and f"--config.vae_workdir={workdir}" in proc.stdout
  assert config.stage == "vae" and config.data.name == "cifar10"
  args = vars(loaded["args"])
  assert {k: config.model[k] for k in import_nvae._ARCH_INT_FLAGS + import_nvae._ARCH_BOOL_FLAGS} == \
      {k: args[k] for k in import_nvae._ARCH_INT_FLAGS + import_nvae._ARCH_BOOL_FLAGS}
  assert (config.model.image_size, config.model.image_channels, config.model.decoder) == (32, 3, "normal")
  assert (config.train.batch_size, config.train.epochs, config.seed) == (200, 3, 1)
  assert config.objective.weight_decay_norm == 0.1 and config.optim.learning_rate == 0.01
  assert int(state.step) == loaded["global_step"] == 1234
  # fresh Adamax moments, the learning-rate schedule where the NVAE run stopped
  counts = {path[-1].tuple_name: int(v) for path, v in
            optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")}
  assert counts == {"TorchAdamaxState": 0, "ScaleByScheduleState": 1234}
  assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state.opt_state[1].exp_avg))
  record = json.loads((workdir / import_nvae.IMPORT_RECORD).read_text())
  assert (record["epoch"], record["global_step"], record["args"]["dataset"]) == (3, 1234, "cifar10")


def test_imported_workdir_reproduces_official_sampling_path(imported):
  d = golden()
  _, _, _, model, state = imported
  eps_z = [nchw_to_nhwc(d[f"in/eps_z/{i}"]) for i in range(model.num_groups)]
  out = jax.jit(functools.partial(nvae.decode_from_eps, model))(state.variables, eps_z, nchw_to_nhwc(d["in/eps_x"]))
  np.testing.assert_allclose(out["logits"], nchw_to_nhwc(d["out/logits"]), rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(out["mean"], nchw_to_nhwc(d["out/mean_image"]), atol=2e-6)
  np.testing.assert_allclose(out["x"], nchw_to_nhwc(d["out/x_sample"]), atol=2e-6)
  np.testing.assert_allclose(out["log_p_z"], d["out/log_p_z"], rtol=1e-5)
  np.testing.assert_allclose(out["log_p_x_given_z"], d["out/log_p_x_given_z"], rtol=1e-5)


def test_imported_workdir_reproduces_official_elbo_path_in_eval_mode(imported):
  d = golden()
  _, _, _, model, state = imported
  eps = [nchw_to_nhwc(d[f"elbo_eval/in/eps/{i}"]) for i in range(model.num_groups)]
  x = nchw_to_nhwc(d["elbo/in/x"])
  out = jax.jit(lambda v, x, eps: model.apply(v, x, False, eps))(state.variables, x, eps)
  assert len(out.kl_all) == model.num_groups
  assert_elbo_matches_golden(d, "eval", out, x)


@pytest.mark.parametrize("bad", ["taken_workdir", "not_a_checkpoint"])
def test_command_reports_bad_input_in_one_line_and_exits_2(imported, tmp_path, bad):
  workdir = imported[0]
  if bad == "taken_workdir":   # never overwrites: the fixture's workdir already holds a checkpoint
    proc, expected = _cli(CHECKPOINT, workdir), "already holds checkpoints"
  else:
    junk = tmp_path / "checkpoint.pt"
    junk.write_text("not a torch file")
    proc, expected = _cli(junk, tmp_path / "out"), "not a torch.save file"
    assert not (tmp_path / "out").exists()
  assert proc.returncode == 2
  assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and expected in proc.stderr, \
      proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("changes,expected", [
    (dict(num_mixture_dec=10), "discretized logistic mixture"),
    (dict(drop=("num_mixture_dec",)), "num_mixture_dec = 10"),   # before the flag existed: always DML-10
    (dict(some_future_flag=True), "some_future_flag"),
    (dict(arch_instance="mbconv_sep"), "'mbconv_sep' is not implemented"),
    (dict(dataset="imagenet_32"), "'imagenet_32' has no input pipeline"),
    (dict(dataset="mnist"), "Bernoulli decoder"),
    (dict(use_se="yes"), "args.use_se = 'yes' is not a bool"),
    (dict(num_channels_enc=32), "does not fit the NVAE of its args"),
])
def test_unusable_checkpoints_are_refused(loaded, tmp_path, changes, expected):
  with pytest.raises(import_nvae.CheckpointImportError, match=expected):
    import_nvae.import_checkpoint(_with_args(loaded, **changes), tmp_path / "vae")
  assert not (tmp_path / "vae").exists()


def test_cell_table_that_disagrees_with_arch_instance_is_refused(loaded, tmp_path):
  cells = dict(loaded["arch_instance"], normal_dec=["res_bnswish", "res_bnswish"])
  with pytest.raises(import_nvae.CheckpointImportError, match="normal_dec"):
    import_nvae.import_checkpoint(dict(loaded, arch_instance=cells), tmp_path / "vae")


def test_old_checkpoint_without_ada_groups_converts_with_the_reference_defaults(loaded, imported):
  old = _with_args(loaded, drop=("ada_groups", "min_groups_per_scale"))
  config, variables, step = import_nvae.convert_checkpoint(old)
  assert step == 1234 and (config.model.ada_groups, config.model.min_groups_per_scale) == (False, 1)
  assert config.model.to_dict() == imported[2].model.to_dict()
  jax.tree.map(np.testing.assert_array_equal, variables, imported[4].variables)
