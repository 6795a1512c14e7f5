"""Running a claims experiment at its `--size=smoke` from a test."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def run_experiment(name, tmp_path, *extra):
  out = tmp_path / "results"
  cmd = [sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--size=smoke", f"--out={out}",
         f"--workdir={tmp_path / 'work'}", *extra]
  subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
  with open(out / f"{name}.json") as f:
    return json.load(f), out
