"""Tests run on CPU with 4 simulated devices (set before JAX initialises its backends).

XLA's persistent compilation cache is on for the test session and the processes it starts (stage runs
of the smoke experiments, the notebook's kernel): most of the suite's time is compiling the same
small NVAE programs again — in a resumed run, in each experiment stage, in every test that builds a
loop — and identical programs are then compiled once. `VAEBM_TEST_XLA_CACHE=` (empty) turns it off.
For the same reason XLA:CPU compiles at LLVM optimisation level 0 here (compiling the smoke models
halves; they run a little slower, which tests do not time), and with its older loop emitters instead of
the MLIR fusion emitters (the compiles halve again). `VAEBM_TEST_FAST_COMPILE=0` turns both off.

The native depthwise kernel is partitioned by `custom_partitioning`, whose lowering names its Python
callback by address: every trace of a program that uses it hashed to a new cache key, and nothing was
ever found in the cache. JAX's `jax_remove_custom_partitioning_ptr_from_cache_key` hashes it without
the address. That is safe only while the partitioning rules behind a cached program do not change, so
the cache directory is named after the kernel module's source.
"""

import hashlib
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "vaebm_jax", "models", "depthwise.py"), "rb") as _f:
  _PARTITIONING = hashlib.sha256(_f.read()).hexdigest()[:12]
_CACHE = os.environ.get("VAEBM_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "vaebm_jax_test_xla_cache"))
if _CACHE and "JAX_COMPILATION_CACHE_DIR" not in os.environ:          # all inherited by subprocesses
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_CACHE, f"depthwise-{_PARTITIONING}")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  os.environ.setdefault("JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY", "1")
if os.environ.get("VAEBM_TEST_FAST_COMPILE", "1") != "0" and "xla_backend_optimization_level" not in \
    os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402

if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)

GOLDEN = os.path.join(ROOT, "..", "shared", "reference", "vaebm_small_golden.npz")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a long end-to-end test (minutes), e.g. executing a notebook")
  if hasattr(config.option, "loadscopereorder"):   # pytest-xdist: hand out files in the order below, not by
    config.option.loadscopereorder = False       # their number of tests


def pytest_collection_modifyitems(config, items):
  """Files holding slow tests first: with `-n 2 --dist loadfile` a file runs on one worker, and a slow file
  handed out last leaves the other worker idle for minutes at the end of the suite."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)        # stable: order within a file unchanged
