"""Importer for official PyTorch NVAE / VAEBM weights (NVlabs/NVAE, NVlabs/VAEBM state_dicts).

`nvae_variables_from_torch` maps a state_dict (name → numpy array) to this package's
`{'params', 'batch_stats'}` for an `NVAE`, whose identical latent groups are stacked per scale.
Kernels go from OIHW to HWIO, `log_weight_norm` from (C, 1, 1, 1) to (C,), `prior_ftr0` from CHW
to HWC, BN `running_*` into 'batch_stats'. The
reference loads with `strict=True`, which can skip tensors silently (VAEBM_SPEC.md §9.15); here
`check_against` compares every converted tensor with the model's own variables and fails on any
missing, extra or mis-shaped one.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

_SKIPPED_LEAVES = ("num_batches_tracked", "weight_normalized")

# Sequential indices of the reference that our modules do not have, and renamed sub-modules.
_NVAE_RENAMES = [
    (r"^enc0\.1\.", "enc0."),
    (r"^dec_sampler\.(\d+)\.1\.", r"dec_sampler.\1."),
    (r"^image_conditional\.1\.", "image_conditional."),
    (r"\.skip\.1\.", ".skip."),
    (r"\.cell(\d)\.conv\.convz\.(\d)\.", r".cell\1.convz_\2."),
    (r"\.mu\.conv_0\.", ".mu."),
    (r"\.se\.se\.(\d)\.", r".se.se_\1."),
]
# Positions inside the reference's InvertedResidual Sequential (after an optional upsampling).
_INVERTED_RESIDUAL = {
    "0.bn": "bn_in", "1.conv.0": "conv_expand", "1.conv.1": "bn_expand", "2.conv.0": "conv_depthwise",
    "2.conv.1": "bn_depthwise", "3": "conv_project", "4.bn": "bn_out",
}


def _rename_inverted_residuals(names: Iterable[str]) -> dict[str, str]:
  """Maps `..._ops.N.conv.<pos>.` prefixes to our names, shifting by one after an upsampling."""
  max_pos: dict[str, int] = {}
  pattern = re.compile(r"^(.*\._ops\.\d+\.conv)\.(\d+)\.")
  for name in names:
    m = pattern.match(name)
    if m:
      max_pos[m.group(1)] = max(max_pos.get(m.group(1), 0), int(m.group(2)))
  mapping = {}
  for name in names:
    m = pattern.match(name)
    if not m:
      continue
    offset = 1 if max_pos[m.group(1)] == 5 else 0   # 5 = the last BN when an upsampling comes first
    rest = name[len(m.group(1)) + 1:]
    pos = int(m.group(2)) - offset
    for key, ours in _INVERTED_RESIDUAL.items():
      head = key.split(".")
      parts = rest.split(".")
      if [str(pos)] + parts[1:len(head)] == head:
        mapping[name] = m.group(1)[:-len(".conv")] + "." + ours + "." + ".".join(parts[len(head):])
        break
    else:
      raise KeyError(f"unrecognised inverted-residual tensor {name!r}")
  return mapping


def _convert_leaf(leaf: str, value: np.ndarray) -> tuple[str, str, np.ndarray]:
  """Returns (collection, flax leaf name, converted array)."""
  if leaf == "weight":
    if value.ndim == 4:
      return "params", "kernel", value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
      return "params", "kernel", value.T
    return "params", "scale", value
  if leaf == "bias":
    return "params", "bias", value
  if leaf == "log_weight_norm":
    return "params", "log_weight_norm", value.reshape(-1)
  if leaf == "running_mean":
    return "batch_stats", "mean", value
  if leaf == "running_var":
    return "batch_stats", "var", value
  if leaf == "prior_ftr0":
    return "params", "prior_ftr0", value.transpose(1, 2, 0)
  raise KeyError(f"unrecognised tensor kind {leaf!r}")


def convert_state_dict(state: Mapping[str, np.ndarray], renames=()) -> dict[str, Any]:
  """Generic state_dict → nested {'params', 'batch_stats'} conversion with regex renames."""
  names = [n for n in state if n.split(".")[-1] not in _SKIPPED_LEAVES]
  ir = _rename_inverted_residuals(names)
  flat = {}
  for name in names:
    path = ir.get(name, name)
    for pattern, repl in renames:
      path = re.sub(pattern, repl, "." + path if pattern.startswith(r"\.") else path)
      path = path.lstrip(".")
    path = re.sub(r"^_ops\.", "ops.", re.sub(r"\._ops\.", ".ops.", path))
    parts = path.split(".")
    modules, leaf = parts[:-1], parts[-1]
    joined: list[str] = []
    for p in modules:   # list indices join their owner: pre_process.0 → pre_process_0
      if p.isdigit() and joined:
        joined[-1] = f"{joined[-1]}_{p}"
      else:
        joined.append(p)
    collection, leaf_name, value = _convert_leaf(leaf, np.asarray(state[name]))
    flat[(collection, *joined, leaf_name)] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def restack(tree: Mapping[str, Any], module_map: Mapping[str, tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  """Moves the reference's flat module-list entries to our paths, stacking scanned groups on axis 0."""
  flat, stacks = {}, {}
  for (collection, first, *rest), value in traverse_util.flatten_dict(dict(tree)).items():
    path, index = module_map.get(first, ((first,), None))
    key = (collection, *path, *rest)
    if index is None:
      flat[key] = value
    else:
      stacks.setdefault(key, {})[index] = value
  for key, parts in stacks.items():
    missing = sorted(set(range(max(parts) + 1)) - set(parts))
    if missing:
      raise ValueError(f"checkpoint lacks groups {missing} of {'/'.join(key)}")
    flat[key] = np.stack([parts[i] for i in range(len(parts))])
  return traverse_util.unflatten_dict(flat)


def nvae_variables_from_torch(state: Mapping[str, np.ndarray], model) -> dict[str, Any]:
  """Official NVAE state_dict → `{'params', 'batch_stats'}` for the `NVAE` instance `model`.

  The model fixes the layout: the groups of each latent scale are stacked for its `nn.scan`.
  """
  return restack(convert_state_dict(state, _NVAE_RENAMES), model.torch_module_map())


def check_against(converted: Mapping[str, Any], reference: Mapping[str, Any]) -> None:
  """Raises ValueError listing every tensor that is missing, extra or of the wrong shape."""
  ours = traverse_util.flatten_dict(dict(converted), sep="/")
  theirs = traverse_util.flatten_dict({k: reference[k] for k in ("params", "batch_stats") if k in reference},
                                      sep="/")
  problems = [f"missing from checkpoint: {k}" for k in sorted(set(theirs) - set(ours))]
  problems += [f"not in model: {k}" for k in sorted(set(ours) - set(theirs))]
  problems += [f"shape {ours[k].shape} != {theirs[k].shape}: {k}" for k in sorted(set(ours) & set(theirs))
               if tuple(ours[k].shape) != tuple(theirs[k].shape)]
  if problems:
    raise ValueError(f"{len(problems)} tensors do not match:\n" + "\n".join(problems[:50]))
