"""What the claims experiments share: running the two stage loops through the CLI (each stage in its
own process, with its config's device setup, resuming where a previous run stopped), and writing
`experiments/results/<name>.json` with the command, seed, wall time and host.

Import this before JAX starts (it sets the simulated CPU device count for the evaluation process).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def setup_devices(count: int) -> None:
  """`count` simulated CPU devices for this process (before JAX initialises; no-op on accelerators)."""
  import jax
  if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
    jax.config.update("jax_num_cpu_devices", count)


def stage_configs(name: str):
  """(stage-1 config, stage-2 config) of `configs/<name>_vae.py` and `configs/<name>_ebm.py`."""
  import importlib
  return (importlib.import_module(f"configs.{name}_vae").get_config(),
          importlib.import_module(f"configs.{name}_ebm").get_config())


def claims_workdir(name: str, smoke: bool, override: str | None = None) -> str:
  """`override`, or workdirs/claims/<name>[_smoke] under the repository."""
  return override or os.path.join(ROOT, "workdirs", "claims", name + ("_smoke" if smoke else ""))


def run_stage(config: str, workdir: str, overrides: Sequence[str] = (), mode: str | None = None) -> float:
  """Runs `python -m vaebm_jax.main --config=CONFIG --workdir=W [--mode] [--config.k=v ...]` to the end.

  A finished workdir resumes at its last step and returns at once. Returns the wall time in seconds.
  """
  cmd = [sys.executable, "-m", "vaebm_jax.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += [f"--mode={mode}"] if mode else []
  cmd += [f"--config.{o}" for o in overrides]
  print("$ " + " ".join(cmd[1:]), flush=True)
  start = time.time()
  subprocess.run(cmd, check=True, cwd=ROOT)
  return time.time() - start


def host() -> dict[str, Any]:
  """CPU model and vector ISA of this host (timings differ up to 3× between the hosts we meet)."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
        if key.strip() == "flags":
          break
  except OSError:
    pass
  model, flags = info.get("model name", platform.processor()), info.get("flags", "")
  family_model = f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')}"
  words = set(flags.split())
  isa = "avx512" if "avx512f" in words else "avx2" if "avx2" in words else "other"
  isa += "+amx" if "amx_tile" in words else ""
  return {"cpu": model, "isa": isa, "cores": os.cpu_count(), "family_model": family_model}


def write_result(name: str, out_dir: str, payload: dict[str, Any]) -> str:
  """Writes `<out_dir>/<name>.json` (with the command line, host and date) and returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  payload = dict(payload, command="python " + " ".join(sys.argv), host=host(),
                 date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, sort_keys=True, default=float)
  print(f"wrote {path}", flush=True)
  return path
