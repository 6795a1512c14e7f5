"""kill -9 a stage run at a random moment, rerun the same command: the final state equals an
uninterrupted run's, leaf for leaf (parameters, optimiser, power-iteration vectors, replay buffer, step).

Both stages run through the CLI (`python -m vaebm_jax.main`) on the 2-D configs at their smoke size, with a
checkpoint every 2 steps so that the kill lands between, or during, checkpoint writes."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.experiment_helpers import ROOT

pytestmark = pytest.mark.slow   # six CLI runs

STEPS = 40
COMMON = [f"--config.train.num_train_steps={STEPS}", "--config.train.checkpoint_every_steps=2",
          "--config.train.log_every_steps=2", "--config.seed=3"]
STAGES = {
    "vae": ["--config=configs/gaussians25_vae.py:smoke", "--config.train.eval_every_steps=0"],
    "ebm": ["--config=configs/gaussians25_ebm.py:smoke", "--config.buffer.use=True", "--config.buffer.anneal_steps=4",
            "--config.train.image_every_steps=0"],
}


def _command(stage, workdir, vae_workdir=None):
  cmd = [sys.executable, "-m", "vaebm_jax.main", *STAGES[stage], f"--workdir={workdir}", *COMMON]
  return cmd + ([f"--config.vae_workdir={vae_workdir}"] if vae_workdir else [])


def _final_state(workdir):
  path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path)


def _kill_at_random_then_rerun(cmd, workdir, rng):
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (
      os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))):
    time.sleep(0.05)
  delay = rng.uniform(0.0, 1.5)
  time.sleep(delay)
  killed_at = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
  return f"killed {delay:.2f} s after the first checkpoint; checkpoints then: {killed_at}"


def _assert_same_state(a, b, context):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b, context
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=context)


@pytest.fixture(scope="module")
def rng():
  seed = random.SystemRandom().randrange(2 ** 32)
  print(f"kill timing seed {seed}")
  return random.Random(seed)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("kill") / "vae_full")
  subprocess.run(_command("vae", workdir), cwd=ROOT, check=True, capture_output=True)
  return workdir


def test_stage1_killed_and_rerun_equals_uninterrupted(stage1, tmp_path, rng):
  workdir = str(tmp_path / "vae_killed")
  what = _kill_at_random_then_rerun(_command("vae", workdir), workdir, rng)
  print(what)
  _assert_same_state(_final_state(workdir), _final_state(stage1), what)


def test_stage2_killed_and_rerun_equals_uninterrupted(stage1, tmp_path, rng):
  full = str(tmp_path / "ebm_full")
  subprocess.run(_command("ebm", full, stage1), cwd=ROOT, check=True, capture_output=True)
  workdir = str(tmp_path / "ebm_killed")
  what = _kill_at_random_then_rerun(_command("ebm", workdir, stage1), workdir, rng)
  print(what)
  state = _final_state(workdir)
  assert "buffer" in state and state["buffer"] is not None
  _assert_same_state(state, _final_state(full), what)
