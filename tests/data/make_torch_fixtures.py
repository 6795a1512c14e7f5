"""Writes the tiny torch.save files that tests/test_inception.py reads with `vaebm_jax.torch_pickle`.

Needs PyTorch (CPU build is enough), which the package itself never imports; the tests do not run
this script, they read its committed outputs. Regenerate with, e.g.:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
  /tmp/torchvenv/bin/python tests/data/make_torch_fixtures.py

Outputs (next to this file): `torch_legacy.pt` (`_use_new_zipfile_serialization=False`, the format of
files from torch < 1.6), `torch_zip.pt` (the current zip archive), and `torch_fixtures.json` with the
expected arrays under '/'-joined paths into the saved object.
"""

import argparse
import collections
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class Opaque:
  """A class the reader cannot know: it must come back as a stand-in that keeps the attributes."""

  def __init__(self):
    self.step = 7
    self.name = "adamax"


def build():
  torch.manual_seed(0)
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 4
  view = base[1:, 2:].t()   # storage offset 8, strides (1, 6): not contiguous
  return {
    "base": base,
    "view": view,   # shares base's storage
    "half": torch.tensor([[0.5, -1.25, 65504.0]], dtype=torch.float16),
    "bf16": torch.tensor([1.0, -2.5, 3.140625, 1e30], dtype=torch.bfloat16),
    "long": torch.tensor([0, -3, 2**40 + 1], dtype=torch.int64),
    "int32": torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32),
    "uint8": torch.tensor([0, 7, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.5, dtype=torch.float64),
    "empty": torch.zeros(0, 3),
    "param": torch.nn.Parameter(torch.randn(3, 2)),
    "state_dict": collections.OrderedDict([("conv.weight", torch.randn(2, 1, 3, 3)), ("bn.running_var", torch.ones(2)),
                                           ("bn.num_batches_tracked", torch.tensor(5))]),
    "nested": {
      "args": argparse.Namespace(dataset="cifar10", lr=0.01, layers=[1, 2], flag=True),
      "list": [torch.tensor([1.5, 2.5]), 3, "x"],
      "tuple": (1, torch.tensor([[1, 2]], dtype=torch.int16)),
    },
    "opaque": Opaque(),
  }


def expected(obj, prefix=""):
  """'/'-joined path → {dtype, shape, values} for every tensor in obj."""
  out = {}
  if isinstance(obj, torch.Tensor):
    t = obj.detach()
    dtype = "float32" if t.dtype == torch.bfloat16 else str(t.dtype).removeprefix("torch.")
    values = t.float() if t.dtype == torch.bfloat16 else t
    out[prefix] = {"dtype": dtype, "shape": list(t.shape), "values": values.reshape(-1).tolist()}
  elif isinstance(obj, dict):
    for k, v in obj.items():
      out.update(expected(v, f"{prefix}/{k}" if prefix else str(k)))
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      out.update(expected(v, f"{prefix}/{i}"))
  return out


def main():
  obj = build()
  torch.save(obj, os.path.join(HERE, "torch_legacy.pt"), _use_new_zipfile_serialization=False)
  torch.save(obj, os.path.join(HERE, "torch_zip.pt"))
  with open(os.path.join(HERE, "torch_fixtures.json"), "w") as f:
    # One line per tensor keeps the file short and its diffs readable.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in expected(obj).items()]
    f.write('{"torch_version": ' + json.dumps(torch.__version__) + ',\n"tensors": {\n' + ",\n".join(lines) + "\n}}\n")


if __name__ == "__main__":
  main()
