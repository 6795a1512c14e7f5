"""Two JAX processes on this machine (jax.distributed, CPU collectives through gloo), 2 devices each:
a training step of each stage equals the single-process step on the same global batch (4 devices),
and each process reads its own part of the data (tests/multihost_worker.py does the steps)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")

pytestmark = pytest.mark.slow   # three processes that each compile both stages' steps


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  single = out / "single"
  multi = out / "multi"
  single.mkdir()
  multi.mkdir()
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, f"--process_id={i}", "--num_processes=2", "--local_devices=2",
                             f"--port={port}", f"--out={multi}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  reference = subprocess.run([sys.executable, WORKER, "--local_devices=4", f"--out={single}"], env=env,
                             capture_output=True, text=True, timeout=900)
  logs = [p.communicate(timeout=900)[0] for p in procs]
  assert reference.returncode == 0, reference.stderr[-3000:]
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  return (np.load(single / "process_0.npz"),
          [np.load(multi / f"process_{i}.npz") for i in range(2)])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_each_process_reads_its_own_part_of_the_global_batch(runs, stage):
  single, multi = runs
  shares = [m[f"{stage}/local_batch"] for m in multi]
  assert shares[0].shape[0] == shares[1].shape[0] == single[f"{stage}/local_batch"].shape[0] // 2
  assert not np.array_equal(shares[0], shares[1])
  np.testing.assert_array_equal(np.concatenate(shares), single[f"{stage}/local_batch"])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_training_step_on_two_processes_equals_one_process(runs, stage):
  single, multi = runs
  keys = sorted(k for k in single.files if k.startswith(stage) and not k.endswith("local_batch"))
  assert keys and all(sorted(k for k in m.files if k.startswith(stage) and not k.endswith("local_batch")) == keys
                      for m in multi)
  for key in keys:
    for m in multi:           # every process ends with the same global state as the single process
      np.testing.assert_allclose(m[key], single[key], rtol=2e-5, atol=1e-6, err_msg=key)
