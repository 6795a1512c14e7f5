"""The claims experiments end to end at their `:smoke` size: each one command, through the stage
loops and the metrics, writing its JSON with the keys RESULTS.md reports."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def run_experiment(name, tmp_path, *extra):
  out = tmp_path / "results"
  cmd = [sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--size=smoke", f"--out={out}",
         f"--workdir={tmp_path / 'work'}", *extra]
  subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
  with open(out / f"{name}.json") as f:
    return json.load(f), out


def test_gaussians25_smoke(tmp_path):
  result, out = run_experiment("gaussians25", tmp_path)
  for key in ("ll_true", "ll_vae", "ll_vaebm", "kl_vae", "kl_vaebm"):
    assert isinstance(result[key], float)
  assert abs(result["ll_true"] - (-1.45)) < 0.1          # closed form: log(1/25) − log(2π·0.01) − 1
  assert result["kl_vae"] > 0 and result["checks"]["vae_mass_on_grid"] > 0.9
  assert (out / "gaussians25.png").exists()


def test_stacked_digits_smoke(tmp_path):
  result, out = run_experiment("stacked_digits", tmp_path)
  for key in ("modes_vae", "modes_vaebm", "kl_vae", "kl_vaebm"):
    assert key in result
  assert 1 <= result["modes_vaebm"] <= result["num_samples"] and result["modes_test_images"] > 40
  assert (out / "stacked_digits.png").exists()


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_and_ood_smoke(tmp_path):
  result, out = run_experiment("fashion_mnist", tmp_path)
  for key in ("fid_vae", "fid_vaebm", "fid_pixel_langevin", "fid_ebm_only"):
    assert result[key] > 0
  assert set(result["fid_by_steps"]) == {"0", "2", "4", "8", "16", "32"}
  assert (out / "fashion_mnist_fid_by_steps.png").exists()
  ood, _ = run_experiment("ood", tmp_path)                 # reuses the two stages trained above
  assert set(ood["auroc"]) == {"digits", "uniform_noise", "constant", "flipped"}
  assert all(0.0 <= v <= 1.0 for s in ood["auroc"].values() for v in s.values())
