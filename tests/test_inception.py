"""FID InceptionV3 (Flax), Inception Score, Fréchet distance and the torch-free checkpoint reader."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import traverse_util

from vaebm_jax import torch_pickle
from vaebm_jax.metrics import convert_inception, inception
from vaebm_jax.metrics import fid as fid_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
REFERENCE = os.path.join(ROOT, "..", "shared", "reference")
NVAE_CHECKPOINT = os.path.join(REFERENCE, "nvae_small_checkpoint.pt")
GOLDEN = os.path.join(REFERENCE, "vaebm_small_golden.npz")


# ----------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
  rng = np.random.default_rng(0)
  d = 6
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))   # shared eigenvectors: Σ₁Σ₂ = Q diag(ab) Qᵀ
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid_lib.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
  got = fid_lib.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-8)
  assert fid_lib.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_fid_from_features_matches_direct_scipy_computation():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8))
  y = 0.5 + rng.standard_normal((150, 8)) @ rng.standard_normal((8, 8))
  m1, s1, m2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
  direct = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
  assert fid_lib.fid_from_features(x, (m2, s2)) == pytest.approx(direct, rel=1e-8)


def test_fid_and_reference_statistics_accept_arrays_chunks_and_npz(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.uniform(0, 1, (40, 4, 4, 1)).astype(np.float32)
  others = (images[::-1] ** 2).copy()
  feature_fn = lambda x: (x.reshape(len(x), -1)[:, :6].astype(np.float64), np.zeros((len(x), 1008)))
  mu, sigma = inception.reference_statistics_from_images(images, feature_fn)
  assert mu.shape == (6,) and sigma.shape == (6, 6)
  assert inception.fid(images, (mu, sigma), feature_fn) == pytest.approx(0.0, abs=1e-8)
  whole = inception.fid(others, (mu, sigma), feature_fn)
  assert whole > 0.01
  assert inception.fid(iter([others[:15], others[15:]]), (mu, sigma), feature_fn) == pytest.approx(whole, rel=1e-12)
  fid_lib.save_statistics(str(tmp_path / "ref.npz"), mu, sigma)
  assert inception.fid(others, str(tmp_path / "ref.npz"), feature_fn) == pytest.approx(whole, rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Inception Score


def _reference_inception_score(logits, splits):
  """TTUR / VAEBM's script, literally: softmax by exp/sum, KL to the split's marginal."""
  preds = np.exp(logits) / np.sum(np.exp(logits), 1, keepdims=True)
  scores = []
  for i in range(splits):
    part = preds[(i * preds.shape[0] // splits):((i + 1) * preds.shape[0] // splits), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return np.mean(scores), np.std(scores)


def test_inception_score_of_uniform_predictions_is_one():
  mean, std = inception.inception_score(np.zeros((50, 1008)), splits=5)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("margin", [30.0, 2000.0])   # 2000: probabilities underflow to exactly 0
def test_inception_score_of_confident_predictions_over_k_classes_is_k(margin):
  k, n = 7, 700
  logits = np.zeros((n, 1008))
  logits[np.arange(n), np.arange(n) % k * 3] = margin   # every split holds each class equally often
  mean, std = inception.inception_score(logits, splits=10)
  assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_matches_reference_formula_and_slices_classes():
  logits = np.random.default_rng(3).normal(0, 3, (103, 1008))
  for num_classes in (1000, 1008):
    got = inception.inception_score(logits, splits=4, num_classes=num_classes)
    np.testing.assert_allclose(got, _reference_inception_score(logits[:, :num_classes], 4), rtol=1e-10)
  only_extra = np.zeros((80, 1008))
  only_extra[np.arange(80), 1000 + np.arange(80) % 8] = 40.0   # confident among the 8 non-ImageNet units
  assert inception.inception_score(only_extra, 10, num_classes=1008)[0] == pytest.approx(8.0, rel=1e-6)
  assert inception.inception_score(only_extra, 10, num_classes=1000)[0] == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# The network


def test_inception_shapes_and_parameter_count():
  shapes = inception.variable_shapes()
  assert len(shapes) == 472   # pytorch-fid's state_dict without the 94 num_batches_tracked
  assert sum(int(np.prod(s)) for s in shapes.values()) == 23_885_392
  assert shapes["params/Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
  assert shapes["params/Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
  assert shapes["params/fc/kernel"] == (2048, 1008)
  variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inception.random_variables())
  for shape in [(2, 32, 32, 3), (3, 28, 28, 1), (1, 256, 256, 3)]:
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    pool3, logits = jax.eval_shape(inception.InceptionV3FID().apply, variables, images)
    assert pool3.shape == (shape[0], 2048) and logits.shape == (shape[0], 1008)
  small = inception.InceptionV3FID(resize_input=False)
  assert jax.eval_shape(small.apply, variables, jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))[0].shape == (1, 2048)


def test_forward_pass_at_smallest_input_size_is_finite_and_grayscale_is_repeated_rgb():
  variables = inception.random_variables(0)
  apply = jax.jit(inception.InceptionV3FID(resize_input=False).apply)
  gray = np.random.default_rng(4).uniform(0, 1, (2, 75, 75, 1)).astype(np.float32)
  pool3, logits = apply(variables, np.repeat(gray, 3, axis=-1))
  assert np.isfinite(pool3).all() and np.isfinite(logits).all()
  assert (np.asarray(pool3) >= 0).all() and 0.01 < float(jnp.std(pool3)) < 100   # ReLU features, alive
  w, b = variables["params"]["fc"]["kernel"], variables["params"]["fc"]["bias"]
  np.testing.assert_allclose(logits, np.asarray(pool3) @ w + b, rtol=1e-5, atol=1e-5)
  pool3_gray, _ = jax.jit(inception.InceptionV3FID(resize_input=False).apply)(variables, gray)
  np.testing.assert_array_equal(pool3_gray, pool3)


def test_feature_fn_batches_pads_and_accepts_uint8():
  feature_fn = inception.make_feature_fn(inception.random_variables(1), batch_size=2)
  images = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  pool3, logits = feature_fn(images)   # batches [0, 1] and [2, zero padding]
  assert pool3.shape == (3, 2048) and logits.shape == (3, 1008) and pool3.dtype == np.float32
  again, _ = feature_fn(images[[2, 0]].astype(np.float32) / 255)   # image 2 now beside a real image
  np.testing.assert_allclose(again, pool3[[2, 0]], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="NHWC"):
    feature_fn(images.transpose(0, 3, 1, 2))


def test_resize_matches_pytorch_and_tf1_bilinear_formulas():
  # 2 → 4 by hand: PyTorch (half-pixel, clamped) and TF1 legacy (src = dst · in/out).
  np.testing.assert_allclose(inception.interpolation_matrix(2, 4, "pytorch"),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  np.testing.assert_allclose(inception.interpolation_matrix(2, 4, "tf1"), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  np.testing.assert_allclose(inception.interpolation_matrix(4, 2, "pytorch"), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  rng = np.random.default_rng(6)
  for side in (32, 400):   # enlarging and shrinking: jax.image.resize must not antialias the latter
    x = rng.uniform(0, 1, (1, side, side + 3, 2)).astype(np.float32)
    for mode in inception.RESIZE_MODES:
      mh, mw = inception.interpolation_matrix(side, 299, mode), inception.interpolation_matrix(side + 3, 299, mode)
      expected = np.einsum("oh,pw,nhwc->nopc", mh.astype(np.float64), mw.astype(np.float64), x, optimize=True)
      # 1e-5: float32 source coordinates round differently in jax.image.resize; a half-pixel shift or
      # antialiasing would be off by ~0.5.
      np.testing.assert_allclose(inception.resize_bilinear(jnp.asarray(x), 299, mode), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Weights


def _pytorch_fid_state_dict(variables):
  """Flax variables → pytorch-fid's names and layouts (OIHW kernels, (out, in) fc), as saved by torch."""
  renames = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
  state = {}
  for (_, *modules, leaf), value in traverse_util.flatten_dict(variables).items():
    if leaf == "kernel":
      state[".".join(modules) + ".weight"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    else:
      state[".".join(modules) + "." + renames[leaf]] = value
    if leaf == "var":
      state[".".join(modules) + ".num_batches_tracked"] = np.array(0, np.int64)
  return state


def test_convert_state_dict_round_trip_uses_every_tensor():
  variables = inception.random_variables(2)
  state = _pytorch_fid_state_dict(variables)
  assert len(state) == 472 + 94 and "Mixed_7c.branch3x3dbl_3b.bn.running_mean" in state
  converted = inception.convert_state_dict(state)
  jax.tree.map(np.testing.assert_array_equal, converted, variables)

  missing = dict(state)
  del missing["Mixed_5b.branch_pool.conv.weight"]
  with pytest.raises(ValueError, match="missing params/Mixed_5b/branch_pool/conv/kernel"):
    inception.convert_state_dict(missing)
  with pytest.raises(ValueError, match="unexpected AuxLogits.fc.weight") as error:
    inception.convert_state_dict({**state, "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match=r"params/fc/kernel has shape \(2048, 1000\)"):
    inception.convert_state_dict({**state, "fc.weight": np.zeros((1000, 2048), np.float32)})


def test_save_and_load_params_round_trip(tmp_path):
  variables = inception.random_variables(3)
  inception.save_params(str(tmp_path / "w.npz"), variables)
  jax.tree.map(np.testing.assert_array_equal, inception.load_params(str(tmp_path / "w.npz")), variables)
  np.savez(tmp_path / "bad.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="bad.npz does not fit the FID InceptionV3"):
    inception.load_params(str(tmp_path / "bad.npz"))


def test_convert_inception_command(tmp_path, capsys, monkeypatch):
  assert convert_inception.main([str(tmp_path / "absent.pth"), str(tmp_path / "out.npz")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and "absent.pth" in err and err.count("\n") == 1
  # A torch file of something else (its 'state_dict' entry is not the Inception's) is one line too.
  assert convert_inception.main([os.path.join(DATA, "torch_zip.pt"), str(tmp_path / "out.npz")]) == 2
  err = capsys.readouterr().err
  assert "torch_zip.pt" in err and "does not fit the FID InceptionV3" in err and err.count("\n") == 1

  variables = inception.random_variables(4)
  monkeypatch.setattr(torch_pickle, "load_state_dict", lambda path: _pytorch_fid_state_dict(variables))
  assert convert_inception.main(["pt_inception-2015-12-05-6726825d.pth", str(tmp_path / "out.npz")]) == 0
  jax.tree.map(np.testing.assert_array_equal, inception.load_params(str(tmp_path / "out.npz")), variables)


# ----------------------------------------------------------------------------------------------------
# torch_pickle


def _at(obj, path):
  for part in path.split("/"):
    obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
  return obj


@pytest.mark.parametrize("name", ["torch_legacy.pt", "torch_zip.pt"])
def test_torch_pickle_reads_both_formats(name):
  with open(os.path.join(DATA, "torch_fixtures.json")) as f:
    expected = json.load(f)["tensors"]
  obj = torch_pickle.load(os.path.join(DATA, name))
  for path, spec in expected.items():
    value = _at(obj, path)
    assert isinstance(value, np.ndarray), path
    assert value.dtype == np.dtype(spec["dtype"]) and list(value.shape) == spec["shape"], path
    np.testing.assert_array_equal(value.reshape(-1), np.asarray(spec["values"], spec["dtype"]), err_msg=path)
  assert obj["view"].flags.c_contiguous and obj["view"].flags.writeable   # a copy, not a view of the storage
  args = obj["nested"]["args"]
  assert type(args).__name__ == "Namespace" and args.dataset == "cifar10" and args.layers == [1, 2]
  assert obj["nested"]["list"][1:] == [3, "x"] and obj["nested"]["tuple"][0] == 1
  assert type(obj["state_dict"]).__name__ == "OrderedDict" and list(obj["state_dict"])[0] == "conv.weight"
  opaque = obj["opaque"]   # a class of the writing script: a stand-in keeping its attributes
  assert isinstance(opaque, torch_pickle.TorchObject) and opaque.name == "Opaque"
  assert opaque.state == {"step": 7, "name": "adamax"}
  assert "torch" not in sys.modules


def test_torch_pickle_load_state_dict_picks_the_state_dict_entry():
  state = torch_pickle.load_state_dict(os.path.join(DATA, "torch_zip.pt"))
  assert list(state) == ["conv.weight", "bn.running_var", "bn.num_batches_tracked"]
  assert torch_pickle.load_state_dict(os.path.join(DATA, "torch_legacy.pt"), key="state_dict").keys() == state.keys()
  with pytest.raises(ValueError, match="no entry 'model'"):
    torch_pickle.load_state_dict(os.path.join(DATA, "torch_zip.pt"), key="model")


@pytest.mark.parametrize("name,cut", [("torch_zip.pt", 0.5), ("torch_legacy.pt", 0.3), ("torch_legacy.pt", 0.97)])
def test_torch_pickle_truncated_or_foreign_files_raise_one_value_error(tmp_path, name, cut):
  with open(os.path.join(DATA, name), "rb") as f:
    data = f.read()
  broken = tmp_path / name
  broken.write_bytes(data[:int(len(data) * cut)])
  with pytest.raises(ValueError, match=str(broken)):
    torch_pickle.load(broken)
  text = tmp_path / "notes.txt"
  text.write_text("not a checkpoint\n")
  with pytest.raises(ValueError, match="not a torch.save file"):
    torch_pickle.load(text)


def test_torch_pickle_reads_official_nvae_checkpoint():
  if not (os.path.exists(NVAE_CHECKPOINT) and os.path.exists(GOLDEN)):
    pytest.skip("../shared/reference (NVAE checkpoint and golden file) not present")
  checkpoint = torch_pickle.load(NVAE_CHECKPOINT)
  assert set(checkpoint) == {"epoch", "state_dict", "optimizer", "global_step", "args", "arch_instance",
                             "scheduler", "grad_scalar"}
  assert checkpoint["args"].dataset == "cifar10"
  golden = np.load(GOLDEN)
  state = checkpoint["state_dict"]
  assert sorted(state) == sorted(k[len("nvae/"):] for k in golden.files if k.startswith("nvae/"))
  for key, value in state.items():
    np.testing.assert_array_equal(value, golden[f"nvae/{key}"], err_msg=key)
