"""experiments/fashion_mnist.py and experiments/ood.py end to end at its smoke size:
one command, through the stage loops and the metrics, writing its JSON with the keys experiments/RESULTS.md reports."""

import os

import pytest

from tests.experiment_helpers import FASHION_MNIST, run_experiment

pytestmark = pytest.mark.slow   # trains five smoke stages through the CLI


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_and_ood_smoke(tmp_path):
  result, out = run_experiment("fashion_mnist", tmp_path)
  for key in ("fid_vae", "fid_vaebm", "fid_pixel_langevin", "fid_ebm_only"):
    assert result[key] > 0
  assert set(result["fid_by_steps"]) == {"0", "2"}
  assert (out / "fashion_mnist_fid_by_steps.png").exists()
  ood, _ = run_experiment("ood", tmp_path)                 # reuses the two stages trained above
  assert set(ood["auroc"]) == {"digits", "uniform_noise", "constant", "flipped"}
  assert all(0.0 <= v <= 1.0 for s in ood["auroc"].values() for v in s.values())
