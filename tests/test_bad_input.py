"""Bad input on the command line: one `error:` line on stderr, exit status 2, no traceback.

(The Python-level errors have their own tests: missing datasets in test_data.py, stage-1 workdirs in
test_train_ebm.py, images passed to the metrics in test_metrics_small.py / test_inception.py, `init` of
`sample_fn` in test_sampling.py, unreadable checkpoints in test_loop.py.)"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.experiment_helpers import ROOT
from vaebm_jax import main as main_lib


def _cli(*args):
  result = subprocess.run([sys.executable, "-m", "vaebm_jax.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  return errors[0]


@pytest.mark.parametrize("flag, expected", [
    ("--config.train.bacth_size=8", "--config.train.bacth_size: configs/digits_vae.py has no field 'bacth_size'"),
    ("--config.trian.batch_size=8", "has no field 'trian' there; known: cpu_devices, data, eval, guard"),
    ("--config.train.batch_size=eight", "flag --config.train.batch_size=eight: invalid literal for int()"),
    ("--config.guard.enabled=maybe", "--config.guard.enabled=maybe"),
    ("--config.model.conv_dtype=float16", "--config.model.conv_dtype=float16: must be one of float32, bfloat16"),
])
def test_config_field_errors(flag, expected, tmp_path):
  line = _cli("--config=configs/digits_vae.py", f"--workdir={tmp_path}", flag)
  assert expected in line
  assert not any(tmp_path.iterdir())          # nothing was started, nothing written


def test_config_file_errors(tmp_path):
  assert "No such file or directory: 'configs/nope.py'" in _cli("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert "unknown config variant 'smok'; known: smoke" in _cli("--config=configs/digits_vae.py:smok",
                                                               f"--workdir={tmp_path}")


def test_stage2_without_a_stage1_workdir(tmp_path):
  line = _cli("--config=configs/digits_ebm.py:smoke", f"--workdir={tmp_path / 'ebm'}",
              f"--config.vae_workdir={tmp_path / 'no_vae'}")
  assert "no stage-1 checkpoints" in line and "train the NVAE first" in line


def test_out_of_memory_names_the_knobs(monkeypatch, capsys):
  def exhausted(argv):            # a real XLA allocation failure
    jax.jit(lambda: jnp.zeros((1 << 42,), jnp.float32))().block_until_ready()

  monkeypatch.setattr(main_lib, "main", exhausted)
  monkeypatch.setattr(sys, "argv", ["main", "--config=configs/digits_vae.py"])
  monkeypatch.chdir(ROOT)
  with pytest.raises(SystemExit) as exit_info:
    main_lib.run()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: out of memory (RESOURCE_EXHAUSTED")
  assert "--config.train.batch_size" in err[0] and "remat_cells" in err[0]


def test_check_config_names_the_sub_config_and_warns_once_about_bf16_on_cpu(monkeypatch):
  from configs import digits_vaebm
  from vaebm_jax import workdir as workdir_lib
  from vaebm_jax.errors import ConfigValueError
  warnings = []
  monkeypatch.setattr(workdir_lib.logging, "warning", lambda msg, *args: warnings.append(msg))
  config = digits_vaebm.get_config()
  workdir_lib.check_config(config)
  assert warnings == []
  config.vae.model.conv_dtype = "bfloat16"
  config.ebm.vae_conv_dtype = "bfloat16"
  config.ebm.ebm.conv_dtype = "bfloat16"
  workdir_lib.check_config(config)
  assert len(warnings) == 1 and "bfloat16 is meant for GPUs" in warnings[0]
  config.ebm.ebm.conv_dtype = "float16"
  with pytest.raises(ConfigValueError, match=r"^--config\.ebm\.ebm\.conv_dtype=float16: must be one of"):
    workdir_lib.check_config(config)
