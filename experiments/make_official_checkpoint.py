"""A second official NVAE checkpoint, and what the official code computes with it, for the importer's tests.

Run with a Python that has PyTorch (the reference environment of ../shared/refbench/README.md), not the
project's venv; the official code is imported unmodified from its checkouts, never copied:

  /work/refbench/venv/bin/python experiments/make_official_checkpoint.py --nvae=/work/refbench/NVAE --out=DIR
  cp DIR/checkpoint.pt tests/data/nvae_second_checkpoint.pt
  cp DIR/official_outputs.npz tests/data/nvae_second_outputs.npz

The model is VAEBM's copy of NVAE (`nvae_model.AutoEncoder` of NVlabs/VAEBM, found next to --nvae as
`VAEBM/` unless --vaebm says otherwise): the network is the same as NVAE's `model.py`, and it is what
VAEBM loads NVAE checkpoints into (its `sample` takes ε per group and its Gaussian decoder has the
floored log-density VAEBM uses); ../shared/reference was made with it too. From NVlabs/NVAE come the
command line (`train.py`'s argparse parser, read from the source: it is built under `__main__`) and
the fast Adamax whose `state_dict` the checkpoint holds.

The architecture differs from ../shared/reference's in every size the importer maps: celeba_64
(64×64, `num_x_bits` 5), encoder 2 / decoder 4 channels, 3 latent scales with `ada_groups` (4, 2, 1
groups from the finest scale: the top scale has one group, so no decoder cells), 3 latent channels,
1 encoder / 2 decoder cells per group, 2 pre/post-processing blocks of 1 / 2 cells, 2 flows per group.
Weights are PyTorch's initialisation (seeded); BatchNorm running statistics, BN affine terms and the
weight-norm gains (`log_weight_norm`) are randomised so eval-mode BN and weight normalisation matter.

`checkpoint.pt` is what NVAE's train.py saves: `torch.save({'epoch', 'state_dict', 'optimizer',
'global_step', 'args', 'arch_instance', 'scheduler', 'grad_scalar'})`, with `args` train.py's
Namespace after train.py set `save`, `distributed` and `num_total_iter` on it (a 2-process run, saved
by rank 0 after its third of four epochs); the optimizer (fast Adamax) has taken no step.

`official_outputs.npz` (NCHW float32, batch 2, same key names as ../shared/reference/vaebm_small_golden.npz):
- `meta/nvae_args`: train.py's args as JSON.
- ELBO path (`AutoEncoder.forward`), input `elbo/in/x` (in [0, 1], on the 5-bit grid as train.py feeds
  it), BN eval mode (`elbo_eval/…`) and train mode with batch statistics (`elbo_train/…`):
  `in/eps/<i>` the posterior noise of group i in draw order (top group first, z = μ_q + σ_q ε before the
  flows); `out/logits`, `out/log_q`, `out/log_p`, `out/kl_all/<i>`, `out/kl_diag/<i>`,
  `out/recon_log_prob` (the decoder's floored Gaussian log-density of x, summed per example).
- Sampling path (`AutoEncoder.sample(2, 1.0, eps_z)`, BN eval): `in/eps_z/<i>` (top first), `in/eps_x`;
  `out/logits`, `out/mean_image` (μ_x/2 + 1/2), `out/x_sample` (`NormalDecoder.sample(eps_x)`),
  `out/log_p_z`, `out/log_p_x_given_z` (floored, of x_sample); and, as there is no energy network here,
  `out/dlogp_deps_z/<i>`, `out/dlogp_deps_x` = ∂Σ(log p(z) + log p(x|z))/∂ε (the NVAE part of −∂U/∂ε).
"""

import argparse
import ast
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
import warnings

import numpy as np

BATCH = 2
ITERS_PER_EPOCH = 50     # train.py: len(train_queue); sets num_total_iter and the saved global_step
SAVED_AFTER_EPOCH = 2    # the checkpoint train.py writes at the end of epoch index 2 (of --epochs 4)

# train.py's command line for this model (everything else at train.py's defaults).
TRAIN_FLAGS = [
    "--root", "/tmp/nvae_second", "--save", "second", "--dataset", "celeba_64", "--data", "/tmp/celeba64_lmdb",
    "--batch_size", "16", "--epochs", "4", "--warmup_epochs", "1", "--learning_rate", "6e-3",
    "--weight_decay_norm", "1e-2", "--weight_decay_norm_anneal", "--weight_decay_norm_init", "10",
    "--fast_adamax", "--arch_instance", "res_mbconv", "--num_nf", "2", "--num_x_bits", "5",
    "--num_latent_scales", "3", "--num_groups_per_scale", "4", "--num_latent_per_group", "3",
    "--ada_groups", "--min_groups_per_scale", "1",
    "--num_channels_enc", "2", "--num_preprocess_blocks", "2", "--num_preprocess_cells", "1",
    "--num_cell_per_cond_enc", "1",
    "--num_channels_dec", "4", "--num_postprocess_blocks", "2", "--num_postprocess_cells", "2",
    "--num_cell_per_cond_dec", "2", "--num_mixture_dec", "1",
    "--use_se", "--res_dist", "--num_process_per_node", "2", "--seed", "3",
]


# ---------------------------------------------------------------------------------------------- official code


def train_py_parser(nvae_dir):
  """NVAE train.py's ArgumentParser: its `__main__` block up to `parser.parse_args()`, run as written."""
  path = os.path.join(nvae_dir, "train.py")
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  main = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test).replace('"', "'") ==
          "__name__ == '__main__'"]
  if len(main) != 1:
    raise SystemExit(f"{path}: no single `if __name__ == '__main__':` block")
  stmts = []
  for stmt in main[0].body:
    if isinstance(stmt, ast.Assign) and ast.unparse(stmt.value) == "parser.parse_args()":
      break
    call = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
    text = ast.unparse(call) if call is not None else ""
    if not (text.startswith("parser.add_argument(") or text.startswith("argparse.ArgumentParser(")):
      raise SystemExit(f"{path}:{stmt.lineno}: unexpected statement before parse_args(): {ast.unparse(stmt)}")
    stmts.append(stmt)
  scope = {"argparse": argparse}
  exec(compile(ast.Module(body=stmts, type_ignores=[]), path, "exec"), scope)
  return scope["parser"]


def train_py_args(nvae_dir):
  """args as train.py saves them: parsed, then what its `__main__` and `main()` set on them."""
  args = train_py_parser(nvae_dir).parse_args(TRAIN_FLAGS)
  args.save = args.root + "/eval-" + args.save      # __main__
  args.distributed = True                           # __main__ (both branches)
  args.local_rank, args.global_rank = 0, 0          # rank 0 writes the checkpoint
  args.num_total_iter = ITERS_PER_EPOCH * args.epochs   # main()
  return args


def load_file_module(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def install_shims(vaebm_dir):
  """What the reference needs to run on CPU without its logging extras (its files stay unmodified):
  `.cuda()` is a no-op, matplotlib/tensorboardX (imported by utils.py for logging only) are stubs, and
  SyncBatchNormSwish runs the reference's own single-process branch (F.batch_norm, then Swish) instead
  of refusing CPU tensors."""
  import torch
  import torch.nn.functional as F

  for name in ("matplotlib", "matplotlib.pyplot", "tensorboardX"):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module
  sys.modules["matplotlib"].use = lambda *a, **k: None
  sys.modules["matplotlib"].pyplot = sys.modules["matplotlib.pyplot"]
  sys.modules["tensorboardX"].SummaryWriter = object
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.nn.Module.cuda = lambda self, *a, **k: self

  sys.path.insert(0, vaebm_dir)
  from thirdparty import inplaced_sync_batchnorm as isb

  def single_process_forward(self, input):
    self._check_input_dim(input)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats:
      self.num_batches_tracked = self.num_batches_tracked + 1
      if self.momentum is None:
        factor = 1.0 / self.num_batches_tracked.item()
    out = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                       self.training or not self.track_running_stats, factor, self.eps)
    return isb.swish.apply(out)

  isb.SyncBatchNormSwish.forward = single_process_forward


class PosteriorNoise:
  """Stands in for `distributions.Normal.sample` (ε ~ N(0, I), z = μ + σ ε): ε from a seeded generator,
  every draw recorded in order."""

  def __init__(self, seed):
    import torch
    self.generator = torch.Generator().manual_seed(seed)
    self.drawn = []

  def __call__(self, dist):
    import torch
    eps = torch.randn(dist.mu.shape, generator=self.generator, dtype=dist.mu.dtype)
    self.drawn.append(eps.clone())
    return eps * dist.sigma + dist.mu, eps


# ---------------------------------------------------------------------------------------------- build


def randomise(model, seed):
  """BN running stats and affine terms, and the weight-norm gains, away from their initial values."""
  import torch
  from torch.nn.modules.batchnorm import _BatchNorm
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, _BatchNorm):
        n = module.num_features
        module.running_mean.copy_(0.3 * torch.randn(n, generator=g))
        module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
        module.num_batches_tracked.fill_(int(torch.randint(1, 10000, (), generator=g)))
        if module.affine:
          module.weight.copy_(0.6 + 0.8 * torch.rand(n, generator=g))
          module.bias.copy_(0.2 * torch.randn(n, generator=g))
    for name, p in model.named_parameters():
      if name.endswith("log_weight_norm"):
        p.add_(0.2 * torch.randn(p.shape, generator=g))


def build_model(args, arch_instance):
  import torch
  from nvae_model import AutoEncoder
  torch.manual_seed(args.seed)
  return AutoEncoder(args, None, arch_instance)


def checkpoint_dict(nvae_dir, model, args, arch_instance):
  """The dict train.py's `torch.save` writes, for this model and args."""
  import torch
  adamax = load_file_module("nvae_thirdparty_adamax", os.path.join(nvae_dir, "thirdparty", "adamax.py"))
  optimizer = adamax.Adamax(model.parameters(), args.learning_rate, weight_decay=args.weight_decay, eps=1e-3)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
      optimizer, float(args.epochs - args.warmup_epochs - 1), eta_min=args.learning_rate_min)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for epoch in range(SAVED_AFTER_EPOCH + 1):
      if epoch > args.warmup_epochs:
        scheduler.step()
    try:
      grad_scalar = torch.amp.GradScaler("cuda", 2 ** 10)     # train.py: torch.cuda.amp.GradScaler(2**10)
    except (AttributeError, TypeError):
      grad_scalar = torch.cuda.amp.GradScaler(2 ** 10)
  return {"epoch": SAVED_AFTER_EPOCH + 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
          "global_step": ITERS_PER_EPOCH * (SAVED_AFTER_EPOCH + 1), "args": args, "arch_instance": arch_instance,
          "scheduler": scheduler.state_dict(), "grad_scalar": grad_scalar.state_dict()}


# ---------------------------------------------------------------------------------------------- outputs


def elbo_outputs(model, x, seed, prefix):
  import distributions
  import torch
  noise = PosteriorNoise(seed)
  saved = distributions.Normal.sample
  distributions.Normal.sample = lambda self: noise(self)
  try:
    with torch.no_grad():
      logits, log_q, log_p, kl_all, kl_diag = model(x)
      recon = torch.sum(model.decoder_output(logits).log_prob(x), dim=[1, 2, 3])
  finally:
    distributions.Normal.sample = saved
  assert len(noise.drawn) == len(kl_all) == sum(model.groups_per_scale)
  out = {f"{prefix}/in/eps/{i}": e for i, e in enumerate(noise.drawn)}
  out.update({f"{prefix}/out/logits": logits, f"{prefix}/out/log_q": log_q, f"{prefix}/out/log_p": log_p,
              f"{prefix}/out/recon_log_prob": recon})
  for i, (a, d) in enumerate(zip(kl_all, kl_diag, strict=True)):
    out[f"{prefix}/out/kl_all/{i}"], out[f"{prefix}/out/kl_diag/{i}"] = a, d
  return out


def sampling_outputs(model, seed):
  import distributions
  import torch
  noise = PosteriorNoise(seed)   # draws ε_z once in the order `sample` asks for it, for the shapes
  saved = distributions.Normal.sample
  distributions.Normal.sample = lambda self: noise(self)
  try:
    with torch.no_grad():
      model.sample(BATCH, 1.0)
  finally:
    distributions.Normal.sample = saved
  eps_z = [e.clone().requires_grad_(True) for e in noise.drawn]
  g = torch.Generator().manual_seed(seed + 1)
  size = model.input_size
  eps_x = torch.randn((BATCH, 3, size, size), generator=g).requires_grad_(True)

  logits, _, log_p_z = model.sample(BATCH, 1.0, eps_z)
  output = model.decoder_output(logits)
  x_sample = output.sample(eps_x)
  log_p_x_given_z = torch.sum(output.log_prob(x_sample), dim=[1, 2, 3])
  grads = torch.autograd.grad(torch.sum(log_p_z + log_p_x_given_z), eps_z + [eps_x])
  out = {f"in/eps_z/{i}": e for i, e in enumerate(eps_z)}
  out.update({"in/eps_x": eps_x, "out/logits": logits, "out/mean_image": output.dist.mu / 2.0 + 0.5,
              "out/x_sample": x_sample, "out/log_p_z": log_p_z, "out/log_p_x_given_z": log_p_x_given_z,
              "out/dlogp_deps_x": grads[-1]})
  out.update({f"out/dlogp_deps_z/{i}": d for i, d in enumerate(grads[:-1])})
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--nvae", required=True, help="NVlabs/NVAE checkout (train.py, thirdparty/adamax.py)")
  parser.add_argument("--vaebm", help="NVlabs/VAEBM checkout (nvae_model.py); default: VAEBM next to --nvae")
  parser.add_argument("--out", required=True, help="output folder: checkpoint.pt, official_outputs.npz")
  opts = parser.parse_args()
  nvae_dir = os.path.abspath(opts.nvae)
  vaebm_dir = os.path.abspath(opts.vaebm or os.path.join(os.path.dirname(nvae_dir), "VAEBM"))

  import torch
  torch.set_num_threads(1)
  install_shims(vaebm_dir)
  import utils

  args = train_py_args(nvae_dir)
  arch_instance = utils.get_arch_cells(args.arch_instance)
  model = build_model(args, arch_instance)
  randomise(model, seed=11)
  model.eval()
  state_dict = {k: v.clone() for k, v in model.state_dict().items()}   # before anything runs in train mode

  g = torch.Generator().manual_seed(5)
  size = model.input_size
  x = utils.pre_process(torch.rand((BATCH, 3, size, size), generator=g), args.num_x_bits)  # as train.py feeds it
  outputs = {"elbo/in/x": x}
  outputs.update(elbo_outputs(model, x, seed=21, prefix="elbo_eval"))
  outputs.update(sampling_outputs(model, seed=31))
  trained = build_model(args, arch_instance)   # a second copy for train mode: BN there updates running stats
  trained.load_state_dict(state_dict)
  trained.train()
  outputs.update(elbo_outputs(trained, x, seed=41, prefix="elbo_train"))

  model.load_state_dict(state_dict)
  ckpt = checkpoint_dict(nvae_dir, model, args, arch_instance)
  os.makedirs(opts.out, exist_ok=True)
  torch.save(ckpt, os.path.join(opts.out, "checkpoint.pt"))
  arrays = {k: v.detach().numpy().astype(np.float32) for k, v in outputs.items()}
  arrays["meta/nvae_args"] = np.array(json.dumps(vars(args), sort_keys=True))
  np.savez(os.path.join(opts.out, "official_outputs.npz"), **arrays)
  n_params = sum(p.numel() for p in model.parameters())
  print(f"groups per scale {model.groups_per_scale}, {n_params} parameters, {len(state_dict)} state_dict entries")
  for name in ("checkpoint.pt", "official_outputs.npz"):
    print(f"wrote {os.path.join(opts.out, name)} ({os.path.getsize(os.path.join(opts.out, name))} bytes)")


if __name__ == "__main__":
  main()
