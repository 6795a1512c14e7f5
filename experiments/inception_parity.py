"""Parity of `vaebm_jax.metrics.inception` with pytorch-fid's own network, on random weights.

Two halves, in two Python environments (the package never imports torch):

  # 1. needs torch, torchvision and pytorch-fid's source (src/pytorch_fid/inception.py on sys.path):
  /tmp/torchvenv/bin/python experiments/inception_parity.py torch /tmp/inception_parity [PYTORCH_FID_SRC]
  # 2. in the project's environment:
  python experiments/inception_parity.py jax /tmp/inception_parity

Half 1 builds pytorch-fid's `fid_inception_v3()` (FIDInceptionA/C/E patches) and its `InceptionV3`
wrapper (resize + 2x − 1), with random weights and random BN statistics in place of the downloaded
ones, saves that state_dict with `torch.save(..., _use_new_zipfile_serialization=False)` — the format
of the real `pt_inception-2015-12-05-6726825d.pth` — and records pool-3 features, logits (`fc` of the
pool-3 features) and the bilinear resizes for images of several sizes. Half 2 converts the file with
`convert_inception`, runs `make_feature_fn` and prints max |ours − theirs|; it also checks the 'tf1'
resize against TensorFlow's `tf.compat.v1.image.resize_bilinear` when TensorFlow is installed.

If torchvision's compiled ops do not match the installed torch ("operator torchvision::nms does not
exist"), half 1 skips torchvision's op registrations, which the Inception model does not use.
"""

import os
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ((32, 3), (64, 3), (28, 1), (256, 3), (512, 3))   # (side, channels); 512 → 299 shrinks
BATCH = 3


def inputs(side: int, channels: int) -> np.ndarray:
  return np.random.default_rng(side).uniform(0, 1, (BATCH, side, side, channels)).astype(np.float32)


def torch_half(out_dir: str, fid_src: str) -> None:
  import torch
  import torch.nn.functional as F
  sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
  sys.path.insert(0, fid_src)
  from pytorch_fid import inception as pf

  torch.manual_seed(0)
  real_load = torch.nn.Module.load_state_dict
  pf.load_state_dict_from_url = lambda *a, **k: {}
  torch.nn.Module.load_state_dict = lambda self, *a, **k: None   # build without downloaded weights
  try:
    net = pf.fid_inception_v3()
  finally:
    torch.nn.Module.load_state_dict = real_load
  with torch.no_grad():   # weights that keep activations O(1), BN statistics that are not the identity
    for name, p in net.state_dict().items():
      if name.endswith("conv.weight"):
        p.copy_(torch.randn_like(p) * (2.0 / p[0].numel()) ** 0.5)
      elif name.endswith(("bn.weight", "running_var")):
        p.uniform_(0.5, 1.5)
      elif name.endswith(("bn.bias", "running_mean", "fc.bias")):
        p.copy_(0.1 * torch.randn_like(p))
      elif name == "fc.weight":
        p.copy_(torch.randn_like(p) / 2048 ** 0.5)
  state = net.state_dict()
  pf.load_state_dict_from_url = lambda *a, **k: state
  wrapper = pf.InceptionV3([3]).eval()   # pytorch-fid's own path: loads `state` strictly
  net.eval()
  os.makedirs(out_dir, exist_ok=True)
  torch.save(state, os.path.join(out_dir, "pt_inception_random.pth"), _use_new_zipfile_serialization=False)
  record = {}
  with torch.no_grad():
    for side, channels in SIZES:
      x = inputs(side, channels)
      t = torch.from_numpy(x).permute(0, 3, 1, 2)
      if channels == 1:
        t = t.repeat(1, 3, 1, 1)
      pool3 = wrapper(t)[0].flatten(1)
      record[f"{side}x{channels}/pool3"] = pool3.numpy()
      record[f"{side}x{channels}/logits"] = net.fc(pool3).numpy()
      record[f"{side}x{channels}/resized"] = F.interpolate(t, size=(299, 299), mode="bilinear",
                                                           align_corners=False).permute(0, 2, 3, 1).numpy()
  np.savez(os.path.join(out_dir, "torch_outputs.npz"), torch_version=torch.__version__, **record)
  print(f"wrote {out_dir}: {len(state)} tensors, torch {torch.__version__}")


def jax_half(out_dir: str) -> None:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp

  from vaebm_jax.metrics import convert_inception, inception

  npz = os.path.join(out_dir, "inception_random.npz")
  if convert_inception.main([os.path.join(out_dir, "pt_inception_random.pth"), npz]) != 0:
    sys.exit(1)
  ref = np.load(os.path.join(out_dir, "torch_outputs.npz"))
  feature_fn = inception.make_feature_fn(inception.load_params(npz), batch_size=BATCH)
  print(f"backend {jax.default_backend()}, torch {ref['torch_version']}")
  print("| input | max abs Δ resize | max abs Δ pool3 (max |pool3|) | max abs Δ logits (max |logit|) |")
  print("|---|---|---|---|")
  for side, channels in SIZES:
    x = inputs(side, channels)
    key = f"{side}x{channels}"
    pool3, logits = feature_fn(x)
    x3 = np.repeat(x, 3, axis=-1) if channels == 1 else x
    resized = np.asarray(inception.resize_bilinear(jnp.asarray(x3), 299))
    d_res = np.abs(resized - ref[f"{key}/resized"]).max()
    d_pool = np.abs(pool3 - ref[f"{key}/pool3"]).max()
    d_log = np.abs(logits - ref[f"{key}/logits"]).max()
    print(f"| {key} | {d_res:.2e} | {d_pool:.2e} ({np.abs(ref[key + '/pool3']).max():.2f}) | "
          f"{d_log:.2e} ({np.abs(ref[key + '/logits']).max():.2f}) |")
    for antialias in (False, True):
      other = np.asarray(jax.image.resize(jnp.asarray(x3), (BATCH, 299, 299, 3), "bilinear", antialias=antialias))
      print(f"  jax.image.resize(antialias={antialias}) vs F.interpolate: "
            f"{np.abs(other - ref[f'{key}/resized']).max():.2e}")
  try:
    import tensorflow as tf
  except ImportError:
    return
  for side, channels in SIZES:
    x = inputs(side, channels)[..., :1].repeat(3, axis=-1)
    theirs = tf.compat.v1.image.resize_bilinear(x, [299, 299]).numpy()
    ours = np.asarray(inception.resize_bilinear(jnp.asarray(x), 299, "tf1"))
    tf2 = tf.image.resize(x, [299, 299], "bilinear").numpy()
    pt = np.asarray(inception.resize_bilinear(jnp.asarray(x), 299, "pytorch"))
    print(f"{side}: tf1 mode vs tf.compat.v1.image.resize_bilinear {np.abs(ours - theirs).max():.2e}; "
          f"pytorch mode vs tf.image.resize {np.abs(pt - tf2).max():.2e}; pytorch vs tf1 {np.abs(pt - ours).max():.2e}")


if __name__ == "__main__":
  mode, directory = sys.argv[1], sys.argv[2]
  if mode == "torch":
    torch_half(directory, sys.argv[3] if len(sys.argv) > 3 else os.path.join(ROOT, "..", "pytorch-fid", "src"))
  else:
    jax_half(directory)
