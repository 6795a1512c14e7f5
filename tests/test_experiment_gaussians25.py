"""experiments/gaussians25.py end to end at its smoke size:
one command, through the stage loops and the metrics, writing its JSON with the keys experiments/RESULTS.md reports."""

import pytest

from tests.experiment_helpers import run_experiment

pytestmark = pytest.mark.slow   # trains two smoke stages through the CLI


def test_gaussians25_smoke(tmp_path):
  result, out = run_experiment("gaussians25", tmp_path)
  for key in ("ll_true", "ll_vae", "ll_vaebm", "kl_vae", "kl_vaebm"):
    assert isinstance(result[key], float)
  assert abs(result["ll_true"] - (-1.45)) < 0.1          # closed form: log(1/25) − log(2π·0.01) − 1
  assert result["kl_vae"] > 0 and result["checks"]["vae_mass_on_grid"] > 0.9
  assert (out / "gaussians25.png").exists()
