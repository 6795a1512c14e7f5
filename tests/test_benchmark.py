"""experiments/benchmark.py's driver: reading both sides' output, the reference through $REFBENCH, the table.
(The timings themselves are the benchmark's business, never a test's.)"""

import json
import os
import stat
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import benchmark
from vaebm_jax import hostenv


def test_reads_the_json_that_ends_either_side_output():
  ours = "I1126 log line\n{not json either\n" + json.dumps({"s_per_step": 1.5}) + "\n"
  assert benchmark._last_json(ours) == {"s_per_step": 1.5}
  reference = "warning\n" + json.dumps({"sec_per_step": {"median": 2.0}, "task": "langevin"}, indent=1) + "\n"
  assert benchmark._last_json(reference)["sec_per_step"] == {"median": 2.0}
  with pytest.raises(ValueError):
    benchmark._last_json("no result\n")


def test_reference_runs_from_refbench_with_jemalloc_for_large_batches(tmp_path, monkeypatch):
  for d in ("VAEBM", "NVAE", "venv/bin"):
    (tmp_path / d).mkdir(parents=True)
  python = tmp_path / "venv" / "bin" / "python"      # stands in for the reference's python: echoes what it got
  python.write_text("#!/bin/sh\necho \"{\\\"sec_per_step\\\": {\\\"median\\\": 2.0, \\\"min\\\": 1.9},\"\n"
                    "echo \"\\\"first_step_s\\\": 3.0, \\\"threads\\\": 2, \\\"args\\\": \\\"$*\\\", "
                    "\\\"preload\\\": \\\"${LD_PRELOAD:-}\\\"}\"\n")
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("REFBENCH", str(tmp_path))
  ref = benchmark.reference_python()
  if ref is None:
    pytest.skip("../shared/refbench/refbench.py is not beside this checkout")
  small = benchmark.run_reference(ref, "lg_c10_b4", 4, benchmark.ROWS["lg_c10_b4"][-1])
  assert small["s_per_step"] == 2.0 and small["s_per_step_min"] == 1.9 and small["first_step_s"] == 3.0
  assert small["peak_rss_gb"] > 0 and 0.0 <= small["foreign_cpu_frac"] <= 1.0 and not small["jemalloc"]
  large = benchmark.run_reference(ref, "lg_c10_b16", 16, benchmark.ROWS["lg_c10_b16"][-1])
  assert large["jemalloc"] == os.path.exists(benchmark.JEMALLOC)
  # The reference as its users run it, unless asked to run it with our GLIBC_TUNABLES (vaebm_jax/hostenv.py).
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  assert "hugetlb" not in small["glibc_tunables"]
  same = benchmark.run_reference(ref, "lg_c10_b4", 4, benchmark.ROWS["lg_c10_b4"][-1], huge_pages=True)
  assert ("glibc.malloc.hugetlb=1" in same["glibc_tunables"]) == hostenv.huge_pages_available()


def test_reference_on_a_gpu_runs_through_the_wrapper_without_jemalloc(tmp_path, monkeypatch):
  for d in ("VAEBM", "NVAE"):
    (tmp_path / d).mkdir()
  script = tmp_path / "refbench.py"
  script.write_text("")
  python = tmp_path / "python3"                      # a GPU image's python with torch: echoes what it got
  python.write_text("#!/bin/sh\necho \"{\\\"sec_per_step\\\": {\\\"median\\\": 0.2, \\\"min\\\": 0.1},\"\n"
                    "echo \"\\\"peak_gpu_gb\\\": 3.5, \\\"gpu\\\": \\\"Test GPU\\\", \\\"args\\\": \\\"$*\\\", "
                    "\\\"preload\\\": \\\"${LD_PRELOAD:-}\\\"}\"\n")
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("REFBENCH", str(tmp_path))
  assert benchmark.reference_python(str(tmp_path / "missing"), str(script)) is None
  ref = benchmark.reference_python(str(python), str(script))
  assert ref == (str(python), str(script), str(tmp_path))
  out = benchmark.run_reference(ref, "lg_c10_b16", 16, benchmark.ROWS["lg_c10_b16"][-1], device="cuda")
  assert out["s_per_step"] == 0.2 and out["device"] == "Test GPU" and out["peak_gpu_gb"] == 3.5
  assert not out["jemalloc"]


def test_table_of_an_accelerator_reports_device_memory():
  row = {"kind": "langevin", "batch": 16, "speedup": 2.0,
         "reference": {"s_per_step": 0.2, "peak_gpu_gb": 11.6, "peak_rss_gb": 2.5, "foreign_cpu_frac": 0.0},
         "ours": {"s_per_step": 0.1, "compile_s": 35.0, "peak_rss_gb": 6.7, "peak_device_gb": 4.9,
                  "device": "Test GPU", "foreign_cpu_frac": 0.0}}
  result = {"host": {"cpu": "Host CPU", "isa": "avx2", "cores": 16}, "date": "today", "matmul_gflops": 1000.0,
            "reference_device": "cuda", "rows": {"lg_c10_b16": row}}
  lines = benchmark.table(result).splitlines()
  assert lines[0].startswith("Accelerator: Test GPU (ours); reference on cuda.")
  assert "peak GPU memory ref / ours GB" in lines[2]
  assert "| lg_c10_b16 | 16 | 0.200 | 0.100 | **2.00×** | 35.0 | 11.6 / 4.9 | – | 0% / 0% |" in lines
  failed = dict(row, reference_error="boom")
  del failed["reference"], failed["speedup"]
  lines = benchmark.table(dict(result, rows={"ebm_c10_b4": failed})).splitlines()
  assert any(line.startswith("| ebm_c10_b4 | 16 | failed | 0.100 | – |") for line in lines), lines


def test_table_states_ratio_share_of_peak_and_contention():
  row = {"kind": "langevin", "batch": 4, "speedup": 2.0,
         "reference": {"s_per_step": 2.0, "peak_rss_gb": 6.0, "foreign_cpu_frac": 0.0},
         "ours": {"s_per_step": 1.0, "compile_s": 20.0, "peak_rss_gb": 3.0, "flops_per_step": 50e9,
                  "foreign_cpu_frac": 0.25}}
  result = {"host": {"cpu": "Test CPU", "isa": "avx2", "cores": 2}, "date": "today", "matmul_gflops": 100.0,
            "rows": {"lg_c10_b4": row, "small_x": {"batch": 0, "ours": {"error": "boom"}}}}
  lines = benchmark.table(result).splitlines()
  assert "Test CPU (avx2, 2 cores)" in lines[0]
  assert "| lg_c10_b4 | 4 | 2.000 | 1.000 | **2.00×** | 20.0 | 6.0 / 3.0 | 50 (50%) | 0% / 25% |" in lines
  assert any(line.startswith("| small_x |") and "failed: boom" in line for line in lines)


def test_unknown_row_is_one_line(capsys):
  import subprocess
  out = subprocess.run([sys.executable, benchmark.__file__, "--rows=lg_c10_b5"], capture_output=True, text=True)
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      f"error: unknown rows ['lg_c10_b5']; choose from {', '.join(benchmark.ROWS)}"]


def test_our_worker_gets_every_setting_of_the_command(monkeypatch):
  """The parent's flags that change our program reach the worker process (--scan_groups once did not)."""
  from absl.testing import flagsaver
  if not benchmark.FLAGS.is_parsed():
    benchmark.FLAGS.mark_as_parsed()
  seen = []
  monkeypatch.setattr(benchmark, "_measure", lambda cmd, env=None: (seen.append(cmd) or {}, 1.0, 2.0, 0.0))
  with flagsaver.flagsaver(scan_groups=False, conv_dtype="bfloat16", conv_impl="xla", remat=True, flops=False,
                           chain_steps=3, batch=2, devices=1):
    result = benchmark.run_ours("nvae_c10_b4")
  (cmd,) = seen
  for flag in ("--worker=nvae_c10_b4", "--scan_groups=False", "--conv_dtype=bfloat16", "--conv_impl=xla",
               "--remat=True", "--chain_steps=3", "--batch=2", "--devices=1"):
    assert flag in cmd, (flag, cmd)
  assert result["conv_dtype"] == "bfloat16"


def test_compare_options_alternates_the_two_programs_and_reports_the_second(monkeypatch):
  clock, order = [0.0], []
  monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])

  def program(name, costs):
    def run():
      order.append(name)
      clock[0] += costs[len([n for n in order if n == name]) - 1]
    return run
  monkeypatch.setattr(benchmark, "_COMPARE", {})
  times = benchmark._alternate(program("a", [2.0, 2.25, 1.75, 2.5]), program("b", [1.5, 2.5, 1.25, 1.75]), 4)
  assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]     # who goes first alternates
  assert times == [2.0, 2.25, 1.75, 2.5]                        # (binary fractions: exact clock arithmetic)
  out = benchmark._COMPARE
  assert out["times"] == [1.5, 2.5, 1.25, 1.75] and out["base_times"] == times
  assert out["faster_pairs"] == 3 and out["s_per_step_min"] == 1.25
  assert out["s_per_step"] == 1.625 and out["ratio"] == 1.625 / 2.125
