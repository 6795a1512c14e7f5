"""The reference's timing driver (`../shared/refbench/refbench.py`) run on a CUDA GPU.

  python experiments/refbench_gpu.py <path to refbench.py> --cfg cifar10 --task langevin --batch 4 ...

refbench.py times the unmodified official code on CPU: it turns the reference's `.cuda()` calls into
no-ops. This wrapper imports that driver as a module, changes nothing in the reference, and moves the
work onto the GPU instead:
- the reference's `.cuda()` calls do what they do on a GPU machine; the models are built on the CPU as
  the reference builds them and then moved to the GPU, after which `torch.set_default_device('cuda')`
  puts what the driver itself creates (its synthetic batches, seeded generators) there too;
- the EBM's data-dependent init runs on the CPU before the move, in the driver's one-rank gloo group;
- every timestamp the driver takes (its tqdm shim, the NVAE step's clocks) first waits for the GPU
  (`torch.cuda.synchronize`), so that a step's time is the GPU's work, not the launch queue's;
- the result adds `peak_gpu_gb` (`torch.cuda.max_memory_allocated`) and the card's name.
The driver's other shims stay: the SyncBatchNormSwish forward is the reference's own non-synchronised
branch (F.batch_norm then Swish), which is what one GPU runs anyway. `--device=cpu` runs the same
wrapper on the CPU (how its test runs where no GPU is).
"""

import importlib.util
import os
import sys
import time
import types


def load_driver(path):
  spec = importlib.util.spec_from_file_location("refbench", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _generator_on(base, device):
  """`torch.Generator` made on `device` unless told otherwise: a subclass, not a function, since torch's own
  modules use the name in annotations (`torch.Generator | None`)."""
  class Generator(base):
    def __new__(cls, device_=None, *, device=device):
      return base.__new__(cls, device_ or device)

    def __init__(self, *args, **kwargs):
      pass

  return Generator


def adapt(driver, device):
  import torch
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def perf_counter():
    sync()
    return time.perf_counter()

  # refbench reads `time.perf_counter()` through its module global `time`
  driver.time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
  driver.time.perf_counter = perf_counter

  install_shims, build = driver.install_shims, driver.build
  tensor_cuda, module_cuda = torch.Tensor.cuda, torch.nn.Module.cuda

  def install_shims_on_device():
    install_shims()                       # stubs, the SyncBN branch, and `.cuda()` made a no-op ...
    if device == "cuda":                  # ... which on a GPU is undone: the reference's own calls move data
      torch.Tensor.cuda, torch.nn.Module.cuda = tensor_cuda, module_cuda

  def build_on_device(*args, **kwargs):
    """The models built on the CPU (as the reference builds them, numpy masks and all), then moved; what the
    driver creates afterwards (its synthetic batches, seeded generators) is made on the device."""
    a, vae, ebm = build(*args, **kwargs)
    vae = vae.to(device)
    ebm = ebm.to(device) if ebm is not None else None
    torch.set_default_device(device)
    torch.Generator = _generator_on(torch.Generator, device)
    return a, vae, ebm

  driver.install_shims, driver.build = install_shims_on_device, build_on_device

  for name in [k for k in vars(driver) if k.startswith("task_")]:
    task = getattr(driver, name)

    def with_memory(cfg, args, task=task):
      if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
      result = task(cfg, args)
      if device == "cuda":
        result.update(peak_gpu_gb=torch.cuda.max_memory_allocated() / 1e9,
                      gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
      result["device"] = device
      return result

    setattr(driver, name, with_memory)


def main():
  if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
    sys.exit("usage: refbench_gpu.py <path to refbench.py> [--device=cuda|cpu] <refbench.py arguments>")
  path, rest = sys.argv[1], sys.argv[2:]
  device = "cuda"
  for a in list(rest):
    if a.startswith("--device="):
      device = a.split("=", 1)[1]
      rest.remove(a)
  driver = load_driver(os.path.abspath(path))
  adapt(driver, device)
  sys.argv = [path] + rest
  driver.main()


if __name__ == "__main__":
  main()
