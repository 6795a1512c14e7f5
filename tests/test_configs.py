"""Every config file sets only fields its stage's defaults define (a misspelt or renamed field would
otherwise be added silently and ignored), and the two stages name the same settings the same way."""

import glob
import importlib
import os

import ml_collections
import pytest

from configs import default_ebm, default_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*_[ve][ab][em].py"))
               if not os.path.basename(p).startswith("default"))


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys |= _keys(v, f"{prefix}{k}.")
    else:
      keys.add(prefix + k)
  return keys


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg", ["", "smoke"])
def test_config_sets_only_fields_of_its_stage_defaults(name, arg):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  default = (default_vae if config.stage == "vae" else default_ebm).get_default_config()
  extra = _keys(config) - _keys(default)
  if config.get("model_type", "nvae") != "nvae":      # another VAE family brings its own constructor args
    extra = {k for k in extra if not k.startswith("model.")}
  assert not extra, f"configs/{name}.py sets fields its defaults do not define: {sorted(extra)}"


def test_both_stages_have_the_same_section_names():
  vae, ebm = default_vae.get_default_config(), default_ebm.get_default_config()
  for section in ("data", "train", "optim", "objective", "eval"):
    assert section in vae and section in ebm
  shared_train = {"batch_size", "num_train_steps", "log_every_steps", "image_every_steps", "checkpoint_every_steps",
                  "keep_checkpoints", "num_image_samples"}
  assert shared_train <= set(vae.train) and shared_train <= set(ebm.train)
  assert {"learning_rate", "weight_decay"} <= set(vae.optim) & set(ebm.optim)
  assert {"train_steps", "test_steps"} <= set(ebm.langevin) and "capacity" in ebm.buffer
