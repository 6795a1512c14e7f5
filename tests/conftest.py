"""Tests run on CPU with 4 simulated devices (set before JAX initialises its backends)."""

import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)

GOLDEN = os.path.join(ROOT, "..", "shared", "reference", "vaebm_small_golden.npz")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a long end-to-end test (minutes), e.g. executing a notebook")
