"""Small-dataset metrics: OOD AUROC, classifier checkpoints and classifier-feature FID, stacked-digit modes.

Uses the committed classifiers in vaebm_jax/metrics/weights/; Fashion-MNIST tests skip without its IDX files.
"""

import itertools

import jax
import numpy as np
import pytest
import scipy.ndimage
import sklearn.metrics

from vaebm_jax.data import pipeline, sources
from vaebm_jax.metrics import classifier as clf
from vaebm_jax.metrics import modes, ood

# ---------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  s_in = rng.normal(0.7, 1.0, size=300)
  s_out = rng.normal(0.0, 1.0, size=200)
  for a, b in ((s_in, s_out), (np.round(s_in), np.round(s_out)), (np.round(s_in * 2) / 2, s_out[:7])):
    y = np.r_[np.ones(len(a)), np.zeros(len(b))]
    assert ood.auroc(a, b) == pytest.approx(sklearn.metrics.roc_auc_score(y, np.r_[a, b]), abs=1e-12)


def test_auroc_degenerate_cases():
  assert ood.auroc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0
  assert ood.auroc([0.0, 1.0], [2.0, 3.0, 4.0]) == 0.0
  assert ood.auroc(np.full(5, 2.5), np.full(9, 2.5)) == 0.5      # identical: all ties count half
  assert ood.auroc([1.0], [1.0]) == 0.5
  assert ood.auroc(np.arange(10), np.arange(10)) == 0.5
  assert ood.auroc(np.array([1, 2], np.int32), [0]) == 1.0


@pytest.mark.parametrize("bad_in, bad_out", [
    ([], [1.0]), ([1.0], np.zeros((2, 2))), ([1.0, np.nan], [0.0]), ([1.0], [np.inf]), (["a"], [1.0]), (1.0, [1.0]),
])
def test_auroc_rejects_bad_inputs(bad_in, bad_out):
  with pytest.raises(ValueError, match=r"^auroc: scores_(in|out) must be a non-empty 1-D array") as e:
    ood.auroc(bad_in, bad_out)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------- data labels


def test_labels_align_with_images(tmp_path):
  for split, n in (("train", 1500), ("test", 297)):
    assert sources.digits_labels(split).shape == (n,) == sources.digits(split).shape[:1]
  with pytest.raises(sources.DatasetUnavailableError, match="t10k-labels-idx1-ubyte"):
    sources.fashion_mnist_labels("test", str(tmp_path))


def _assert_pipeline_preprocessing(name, size, images, raw):
  for i in (0, 5, 17):
    np.testing.assert_array_equal(images[i], pipeline._preprocess(name, raw[i], size, None, False))


def test_labeled_digits_are_the_pipelines_preprocessing(digits_test):
  _assert_pipeline_preprocessing("digits", 16, digits_test[0], sources.digits("test"))


def test_labeled_fashion_mnist_is_the_pipelines_preprocessing(fashion_test):
  _assert_pipeline_preprocessing("fashion_mnist", 32, fashion_test[0], sources.fashion_mnist("test"))


# ---------------------------------------------------------------- classifiers


@pytest.fixture(scope="module")
def digits_test():
  return clf.labeled_images("digits", "test")


@pytest.fixture(scope="module")
def digits_fns():
  return clf.make_classifier_fns(clf.default_classifier("digits"))


@pytest.fixture(scope="module")
def fashion_test():
  try:
    images, labels = clf.labeled_images("fashion_mnist", "test")
  except sources.DatasetUnavailableError as e:
    pytest.skip(str(e))
  return images, labels


def test_digits_checkpoint_reaches_recorded_accuracy(digits_test, digits_fns):
  meta = clf.default_classifier("digits").meta
  assert meta["input_shape"] == [16, 16, 1] and meta["num_classes"] == 10 and meta["test_accuracy"] >= 0.97
  images, labels = digits_test
  assert np.mean(digits_fns.predict(images) == labels) == pytest.approx(meta["test_accuracy"], abs=0.005)
  assert digits_fns.features(images[:3]).shape == (3, meta["feature_dim"])


def test_fashion_checkpoint_reaches_recorded_accuracy(fashion_test):
  classifier = clf.default_classifier("fashion_mnist")
  assert classifier.meta["input_shape"] == [32, 32, 1] and classifier.meta["test_accuracy"] >= 0.90
  images, labels = fashion_test
  accuracy = np.mean(clf.make_classifier_fns(classifier).predict(images[:2000]) == labels[:2000])
  assert accuracy >= classifier.meta["test_accuracy"] - 0.025


def test_default_classifier_unknown_name():
  with pytest.raises(ValueError, match="no default classifier for 'cifar10'"):
    clf.default_classifier("cifar10")


@pytest.mark.parametrize("images, got", [
    (np.zeros((4, 32, 32, 1), np.float32), "got shape (4, 32, 32, 1)"),
    (np.zeros((16, 16, 1), np.float32), "got shape (16, 16, 1)"),
    (np.zeros((0, 16, 16, 1), np.float32), "got shape (0, 16, 16, 1)"),
    (np.full((2, 16, 16, 1), 255, np.uint8), "got values in [255, 255]"),
    (np.full((2, 16, 16, 1), -0.5, np.float32), "got values in [-0.5, -0.5]"),
    (np.full((2, 16, 16, 1), np.nan, np.float32), "got non-finite values"),
])
def test_classifier_fns_reject_bad_images(digits_fns, images, got):
  for fn in (digits_fns.features, digits_fns.predict, digits_fns.logits):
    with pytest.raises(ValueError) as e:
      fn(images)
    assert str(e.value).startswith("expected images (N, 16, 16, 1) in [0, 1], ") and got in str(e.value)
    assert "\n" not in str(e.value)


def test_train_classifier_deterministic_and_checkpoint_roundtrip(digits_test, tmp_path):
  images, labels = clf.labeled_images("digits", "train")
  kwargs = dict(num_classes=10, steps=4, batch_size=32, widths=(8, 16), feature_dim=16)
  a = clf.train_classifier(images[:300], labels[:300], seed=3, **kwargs)
  b = clf.train_classifier(images[:300], labels[:300], seed=3, **kwargs)
  c = clf.train_classifier(images[:300], labels[:300], seed=4, **kwargs)
  flat = lambda v: np.concatenate([x.ravel() for x in jax.tree.leaves(v)])
  np.testing.assert_array_equal(flat(a.variables), flat(b.variables))
  assert not np.array_equal(flat(a.variables), flat(c.variables))
  path = str(tmp_path / "tiny.npz")
  clf.save_classifier(path, a.variables, a.meta)
  loaded = clf.load_classifier(path)
  assert loaded.meta == a.meta and loaded.input_shape == (16, 16, 1)
  np.testing.assert_array_equal(flat(loaded.variables), flat(a.variables))
  np.testing.assert_array_equal(clf.make_classifier_fns(loaded).logits(digits_test[0][:7]),
                                clf.make_classifier_fns(a).logits(digits_test[0][:7]))


def test_classifier_fid_fashion(fashion_test):
  images = fashion_test[0][np.random.default_rng(0).permutation(10000)[:4000]]
  fns = clf.make_classifier_fns(clf.default_classifier("fashion_mnist"))
  first, second = images[:2000], images[2000:]
  blurred = scipy.ndimage.uniform_filter(first, size=(1, 3, 3, 1))
  noised = np.clip(first + np.random.default_rng(1).normal(0, 0.1, first.shape), 0, 1).astype(np.float32)
  stats = clf.classifier_statistics(second, fns)
  fid_halves = clf.classifier_fid(first, second, fns)
  assert fid_halves == pytest.approx(clf.classifier_fid(first, stats, fns), rel=1e-9)
  for degraded in (blurred, noised):
    assert clf.classifier_fid(degraded, stats, fns) > 10 * fid_halves


# ---------------------------------------------------------------- stacked-digit modes


@pytest.fixture(scope="module")
def correct_digits(digits_test, digits_fns):
  images, labels = digits_test
  keep = digits_fns.predict(images) == labels
  return images[keep], labels[keep]


def test_count_modes_all_triples_once(correct_digits, digits_test, digits_fns):
  triples = np.array(list(itertools.product(range(10), repeat=3)))
  result = modes.count_modes(modes.stack_digits(*correct_digits, triples, seed=0), digits_fns)
  assert result["modes"] == 1000 and result["kl_to_uniform"] == pytest.approx(0.0, abs=1e-12)
  np.testing.assert_array_equal(result["histogram"], np.ones(1000))
  np.testing.assert_array_equal(result["labels"], triples)
  # With every test digit (some misclassified), most triples are still found.
  result = modes.count_modes(modes.stack_digits(*digits_test, triples, seed=0), digits_fns)
  assert result["modes"] >= 900 and result["kl_to_uniform"] < 0.15 and result["histogram"].sum() == 1000


def test_count_modes_single_triple(correct_digits, digits_fns):
  stacked = modes.stack_digits(*correct_digits, np.tile([3, 1, 4], (50, 1)), seed=1)
  result = modes.count_modes(stacked, digits_fns)
  assert result["modes"] == 1 and result["histogram"][314] == 50 and result["num_samples"] == 50
  assert result["kl_to_uniform"] == pytest.approx(np.log(1000), rel=1e-12)


@pytest.mark.parametrize("images", [
    np.zeros((5, 16, 16, 1), np.float32), np.zeros((5, 32, 32, 3), np.float32), np.zeros((16, 16, 3), np.float32),
    np.full((5, 16, 16, 3), 2.0, np.float32),
])
def test_count_modes_rejects_bad_images(digits_fns, images):
  with pytest.raises(ValueError, match=r"^expected stacked images \(N, 16, 16, 3\) in \[0, 1\]") as e:
    modes.count_modes(images, digits_fns)
  assert "\n" not in str(e.value)
