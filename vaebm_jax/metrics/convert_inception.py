"""Converts pytorch-fid's InceptionV3 weights to the `.npz` that `inception.load_params` reads.

  python -m vaebm_jax.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

The input is the weights file pytorch-fid downloads on first use (the TF "inception-2015-12-05" FID
weights, ported by pytorch-fid's author; sha256 prefix 6726825d in its name):

  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(or take it from `~/.cache/torch/hub/checkpoints/` where pytorch-fid keeps it). It is a plain
state_dict, saved in May 2019, before torch 1.6, so in torch's legacy (non-zip) format; both formats
are read by `vaebm_jax.torch_pickle`, without PyTorch. A missing or wrong file is one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from vaebm_jax import torch_pickle
from vaebm_jax.metrics import inception


def convert(src: str, dst: str) -> int:
  """Reads the PyTorch weights `src`, writes the Flax variables to `dst` (.npz).

  Args:
    src: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or any file of the same state_dict).
    dst: output path; numpy appends `.npz` when it is missing.
  Returns:
    The number of arrays written.
  Raises:
    OSError, ValueError: unreadable input or a state_dict of another network.
  """
  state_dict = torch_pickle.load_state_dict(src)
  try:
    variables = inception.convert_state_dict(state_dict)
  except ValueError as e:
    raise ValueError(f"{src}: {e}") from None
  inception.save_params(dst, variables)
  return len(inception.variable_shapes())


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vaebm_jax.metrics.convert_inception",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("src", help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's weights)")
  parser.add_argument("dst", help="output .npz for vaebm_jax.metrics.inception.load_params")
  args = parser.parse_args(argv)
  try:
    n = convert(args.src, args.dst)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {n} arrays to {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
