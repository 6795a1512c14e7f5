"""Importer for official PyTorch NVAE / VAEBM weights (NVlabs/NVAE, NVlabs/VAEBM state_dicts).

`nvae_variables_from_torch` maps a state_dict (name → numpy array) to this package's
`{'params', 'batch_stats'}` for an `NVAE`, whose identical latent groups are stacked per scale.
Kernels go from OIHW to HWIO, `log_weight_norm` from (C, 1, 1, 1) to (C,), `prior_ftr0` from CHW
to HWC, BN `running_*` into 'batch_stats'. The
reference loads with `strict=True`, which can skip tensors silently (VAEBM_SPEC.md §9.15); here
`check_against` compares every converted tensor with the model's own variables and fails on any
missing, extra or mis-shaped one. `torch_module_map` relates the reference's flat module lists to
our (scanned) module tree. Whole `checkpoint.pt` files of NVAE's train.py: `vaebm_jax.import_nvae`.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional

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


def torch_module_map(model) -> dict[str, tuple[tuple[str, ...], Optional[int]]]:
  """Reference module-list entries of the `NVAE` `model` → (our module path, index in its stack or None).

  The reference keeps flat lists (`enc_tower.i`, `dec_tower.i`, `enc_sampler.i`,
  `dec_sampler.i`, `nf_cells.i`); keys are written as our importer joins them (`enc_tower_i`).
  Paths are those of the scanned layout; `nvae.unstack_groups` gives the other.
  """
  groups, scales = model.groups, model.num_latent_scales
  out: dict[str, tuple[tuple[str, ...], Optional[int]]] = {}

  def latent(s_dec: int, g_dec: int, name: str):
    return (f"latent_groups_{s_dec}", name), g_dec - (1 if s_dec == 0 else 0)

  i = 0
  if not model.vanilla_vae:
    for s in range(scales):
      for g in range(groups[s]):
        for c in range(model.num_cell_per_cond_enc):
          out[f"enc_tower_{i}"] = ((f"enc_groups_{s}", f"cell_{c}"), g)
          i += 1
        if not (s == scales - 1 and g == groups[s] - 1):
          out[f"enc_tower_{i}"] = latent(scales - 1 - s, groups[s] - 1 - g, "enc_combiner")
          i += 1
      if s < scales - 1:
        out[f"enc_tower_{i}"] = ((f"down_enc_{s}",), None)
        i += 1
  i = idx = 0
  for s in range(scales):
    for g in range(groups[scales - 1 - s]):
      top = s == 0 and g == 0
      out[f"enc_sampler_{idx}"] = (("enc_sampler_top",), None) if top else latent(s, g, "enc_sampler")
      for n in range(model.num_nf):
        out[f"nf_cells_{idx * model.num_nf + n}"] = ((f"nf_top_{n}",), None) if top else latent(s, g, f"nf_{n}")
      if not top:
        out[f"dec_sampler_{idx - 1}"] = latent(s, g, "dec_sampler")
      idx += 1
      if model.vanilla_vae:
        continue
      if not top:
        for c in range(model.num_cell_per_cond_dec):
          out[f"dec_tower_{i}"] = latent(s, g, f"dec_cell_{c}")
          i += 1
      out[f"dec_tower_{i}"] = (("dec_combiner_top",), None) if top else latent(s, g, "dec_combiner")
      i += 1
    if s < scales - 1 and not model.vanilla_vae:
      out[f"dec_tower_{i}"] = ((f"up_dec_{s}",), None)
      i += 1
  return out


def nvae_variables_from_torch(state: Mapping[str, np.ndarray], model) -> dict[str, Any]:
  """Official NVAE state_dict → `{'params', 'batch_stats'}` for the `NVAE` instance `model`.

  The model fixes the layout: the groups of each latent scale are stacked for its `nn.scan`.
  """
  return restack(convert_state_dict(state, _NVAE_RENAMES), torch_module_map(model))


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
