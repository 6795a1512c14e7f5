"""experiments/stacked_digits.py end to end at its smoke size:
one command, through the stage loops and the metrics, writing its JSON with the keys experiments/RESULTS.md reports."""

import pytest

from tests.experiment_helpers import run_experiment

pytestmark = pytest.mark.slow   # trains two smoke stages through the CLI


def test_stacked_digits_smoke(tmp_path):
  result, out = run_experiment("stacked_digits", tmp_path)
  for key in ("modes_vae", "modes_vaebm", "kl_vae", "kl_vaebm"):
    assert key in result
  assert 1 <= result["modes_vaebm"] <= result["num_samples"] and result["modes_test_images"] > 40
  assert (out / "stacked_digits.png").exists()
