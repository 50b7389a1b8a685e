"""Post-hoc whitening: pairs, rank-deficient learning, storage, compute/reuse from a config."""
import os

import numpy as np
import pytest

from configs import common
from retrieval_jax import sharding
from retrieval_jax.data import datasets
from retrieval_jax.mining import pairs as pairs_lib
from retrieval_jax.postprocess import whitening
from retrieval_jax.postprocess import whitening_store

import numpy_references as ref  # pylint: disable=g-bad-import-order
from test_extract import photos  # pylint: disable=unused-import
from tiny_models import random_variables, tiny_resnet


def _cycle_pairs(train_set, max_pairs=0):
  return pairs_lib.training_pairs(train_set.labels, train_set.qidxs, train_set.pidxs,
                                  pairing="cycle", max_pairs=max_pairs)


def test_pairs_from_the_dataset_or_from_labels():
  own = datasets.TrainSet("x", ["a"] * 6, np.zeros(6, np.int64), qidxs=np.array([0, 2]),
                          pidxs=np.array([1, 3]))
  q, p = _cycle_pairs(own)
  np.testing.assert_array_equal(q, [0, 2])
  np.testing.assert_array_equal(p, [1, 3])
  labels = np.array([5, 5, 5, -1, 7, 7, 9, -1])
  q, p = _cycle_pairs(datasets.TrainSet("y", ["a"] * 8, labels))
  pairs = set(zip(q.tolist(), p.tolist()))
  assert pairs == {(0, 1), (1, 2), (2, 0), (4, 5)}  # a cycle per label; -1 and singletons out
  q, p = _cycle_pairs(datasets.TrainSet("y", ["a"] * 8, labels),
                                          max_pairs=2)
  assert len(q) == 2 and set(zip(q.tolist(), p.tolist())) <= pairs


def _clustered(n_classes, per_class, dim, seed=0):
  rng = np.random.RandomState(seed)
  centres = rng.randn(n_classes, dim)
  x = np.repeat(centres, per_class, axis=0) + 0.3 * rng.randn(n_classes * per_class, dim)
  labels = np.repeat(np.arange(n_classes), per_class)
  return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_full_rank_learned_whitening_is_cirtorchs_whitenlearn():
  """cirtorch's whitenlearn / whitenapply (numpy transcription, columns = descriptors): the
  same mean, the same projection up to each eigenvector's sign, the same whitened rows."""
  x, labels = _clustered(40, 6, 16)
  q, p = _cycle_pairs(datasets.TrainSet("t", [""] * len(x), labels))
  m, proj = whitening.learn(x, "learned", q, p)
  m_ref, p_ref = ref.whitenlearn(x.T, q, p)
  np.testing.assert_allclose(m, m_ref[:, 0], rtol=1e-12, atol=1e-12)
  assert proj.shape == p_ref.shape == (16, 16)
  np.testing.assert_allclose(proj, ref.same_rows_up_to_sign(proj, p_ref), rtol=1e-6,
                             atol=1e-8)
  for dim in (0, 8):
    got = whitening.apply(x, {"m": m, "P": proj}, dim=dim)
    want = ref.whitenapply(x.T, m_ref, ref.same_rows_up_to_sign(proj, p_ref), dim or None).T
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("pca_dim", [0, 12])
def test_rank_deficient_learned_whitening_whitens_the_pairs_it_spans(pca_dim):
  """Fewer pairs than dimensions: P [r, D] is finite and P S P^T = I on its r rows."""
  x, labels = _clustered(10, 3, 64)  # 30 pairs in 64-D, spanning 20 (cycles of 3 sum to 0)
  q, p = _cycle_pairs(datasets.TrainSet("t", [""] * len(x), labels))
  m, proj = whitening.learn(x, "learned", q, p, pca_dim=pca_dim)
  assert np.isfinite(proj).all() and proj.shape[1] == 64
  assert proj.shape[0] == (12 if pca_dim else 20)
  np.testing.assert_allclose(m, x[q].mean(axis=0), atol=1e-12)
  df = (x[q] - x[p]) @ proj.T
  np.testing.assert_allclose(df.T @ df / len(df), np.eye(proj.shape[0]), atol=1e-6)
  out = whitening.apply(x, {"m": m, "P": proj}, dim=8)
  assert out.shape == (len(x), 8) and out.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_rank_deficient_pca_whitening_keeps_the_spanned_components():
  x, _ = _clustered(5, 4, 32)  # 20 images in 32-D: rank 19 after centring
  m, proj = whitening.learn(x, "pca")
  assert proj.shape == (19, 32) and np.isfinite(proj).all()
  y = (x - m) @ proj.T
  np.testing.assert_allclose(y.T @ y / len(x), np.eye(19), atol=1e-6)


def test_save_load_round_trip(tmp_path):
  path = str(tmp_path / "w" / "lw.npz")
  m, proj = np.arange(3.0), np.arange(6.0).reshape(2, 3)
  whitening_store.save(path, m, proj, {"kind": "learned", "checkpoint_step": 4})
  got = whitening_store.load(path)
  np.testing.assert_array_equal(got["m"], m)
  np.testing.assert_array_equal(got["P"], proj)
  assert got["info"] == {"kind": "learned", "checkpoint_step": 4}


@pytest.fixture()
def tiny_trainset(photos):  # pylint: disable=redefined-outer-name
  """A registered labelled set: 5 photos x 2 views (the file and its bounding crops)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  folder = os.path.dirname(photos[0])
  images, labels = [], []
  for i, path in enumerate(photos):
    im = Image.open(path)
    crop = os.path.join(folder, f"crop_{i}.jpg")
    im.crop((0, 0, im.width * 3 // 4, im.height * 3 // 4)).save(crop)
    images += [path, crop]
    labels += [i, i]
  name = "tiny_whiten_pairs"
  if name not in datasets.names():
    datasets.register(name, default_split="train")(
        lambda root, split: datasets.TrainSet(name, images, np.asarray(labels)))
  return name


def _config(dataset, kind):
  c = common.base_config()
  c.data.name = dataset
  c.model.backbone = "resnet18"
  c.extract.long_side = 96
  c.eval.whitening = kind
  return c


@pytest.mark.parametrize("kind", ["learned", "pca", "pfa"])
def test_compute_and_save_then_reuse_until_the_checkpoint_changes(tiny_trainset, kind,
                                                                  tmp_path):
  model = tiny_resnet("gem")
  variables = random_variables(model)
  mesh = sharding.make_mesh()
  workdir = str(tmp_path)
  config = _config(tiny_trainset, kind)
  if kind == "pfa":
    config.eval.whitening_dim = 16
  w = whitening_store.get_or_compute(config, workdir, model, variables, mesh, step=7)
  path = whitening_store.whitening_path(workdir, kind)
  assert os.path.basename(path) == {"learned": "lw.npz", "pca": "pca.npz", "pfa": "pfa.npz"}[kind]
  if kind == "pfa":  # a selection of 16 distinct features, applied as a projection
    assert w["P"].shape == (16, 64) and np.array_equal(w["P"].sum(1), np.ones(16))
    assert len(set(np.argmax(w["P"], 1).tolist())) == 16 and not w["m"].any()
  assert w["info"]["checkpoint_step"] == 7 and w["info"]["num_images"] == 10
  assert w["kind"] == kind and w["m"].shape == (64,) and np.isfinite(w["P"]).all()
  stamp = os.stat(path).st_mtime_ns
  again = whitening_store.get_or_compute(config, workdir, model, variables, mesh, step=7)
  assert os.stat(path).st_mtime_ns == stamp  # reused
  np.testing.assert_array_equal(again["P"], w["P"])
  whitening_store.get_or_compute(config, workdir, model, variables, mesh, step=8)
  assert whitening_store.load(path)["info"]["checkpoint_step"] == 8  # learned again
  config.eval.whitening = ""
  assert whitening_store.get_or_compute(config, workdir, model, variables, mesh, 8) is None
