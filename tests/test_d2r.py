"""Detect-to-Retrieve: aggregation kernels, boxes, --mode=detect, eval.rerank=d2r.

Every kernel is checked against `d2r_reference.py`, a numpy transcription of the
reference's `feature_aggregation_extractor.py` / `feature_aggregation_similarity.py`.
"""
import numpy as np
import pytest

from retrieval_jax.local import aggregation as agg
import d2r_reference as ref

_REF_TYPE = {"vlad": ref.VLAD, "asmk": ref.ASMK, "asmk_star": ref.ASMK_STAR}


def _data(seed=0, n=60, k=16, d=16):
  rng = np.random.default_rng(seed)
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  # Features near the words, so that some words get several features and some none.
  near = codebook[rng.integers(0, k // 2, n)]
  features = (near + 0.6 * rng.normal(size=(n, d))).astype(np.float32)
  return features, codebook


def _configs(kind, regional, k, d, m=1, l2=None):
  ours = agg.AggregationConfig(aggregation_type=kind, codebook_size=k, num_assignments=m,
                               use_regional_aggregation=regional, use_l2_normalization=l2,
                               feature_batch_size=7)
  theirs = ref.Config(codebook_size=k, feature_dimensionality=d,
                      aggregation_type=_REF_TYPE[kind], use_l2_normalization=ours.l2,
                      num_assignments=m, use_regional_aggregation=regional,
                      feature_batch_size=7)
  return ours, theirs


def _check_layout(ours, theirs, kind):
  desc, words = ours.reference_layout()
  r_desc, r_words = theirs
  if kind == "vlad":
    np.testing.assert_allclose(desc, r_desc, atol=2e-6)
  else:
    np.testing.assert_array_equal(words, r_words)
    if kind == "asmk_star":
      assert desc.dtype == np.uint8 and r_desc.dtype == np.uint8
      np.testing.assert_array_equal(desc, r_desc)
    else:
      np.testing.assert_allclose(desc, r_desc, atol=2e-6)


@pytest.mark.parametrize("kind", agg.TYPES)
@pytest.mark.parametrize("m", [1, 3])
def test_plain_kernels_match_reference(kind, m):
  features, codebook = _data()
  ours_cfg, ref_cfg = _configs(kind, False, 16, 16, m)
  assert ours_cfg.l2  # plain kernels: L2 on
  ours = agg.aggregate(features, codebook, ours_cfg)
  _check_layout(ours, ref.Extractor(ref_cfg, codebook).extract(features), kind)


@pytest.mark.parametrize("kind", agg.TYPES)
def test_regional_kernels_match_reference(kind):
  features, codebook = _data(1, n=50)
  counts = [20, 0, 12, 18]  # whole image, an empty box, two boxes
  ours_cfg, ref_cfg = _configs(kind, True, 16, 16, 2)
  assert not ours_cfg.l2  # regional kernels: L2 off (R-VLAD divides by the regions)
  ours = agg.aggregate(features, codebook, ours_cfg, counts)
  _check_layout(ours, ref.Extractor(ref_cfg, codebook).extract(features, counts), kind)


def test_regional_vlad_with_l2_matches_reference():
  features, codebook = _data(2)
  ours_cfg, ref_cfg = _configs("vlad", True, 16, 16, 1, l2=True)
  ours = agg.aggregate(features, codebook, ours_cfg, [30, 30])
  _check_layout(ours, ref.Extractor(ref_cfg, codebook).extract(features, [30, 30]), "vlad")


@pytest.mark.parametrize("kind", agg.TYPES)
def test_empty_features_match_reference(kind):
  _, codebook = _data()
  empty = np.zeros((0, 16), np.float32)
  for regional, counts in ((False, None), (True, [])):
    ours_cfg, ref_cfg = _configs(kind, regional, 16, 16)
    ours = agg.aggregate(empty, codebook, ours_cfg, counts)
    _check_layout(ours, ref.Extractor(ref_cfg, codebook).extract(empty, counts), kind)


@pytest.mark.parametrize("kind", agg.TYPES)
@pytest.mark.parametrize("regional", [False, True])
@pytest.mark.parametrize("alpha,tau", [(3.0, 0.0), (1.0, 0.2)])
def test_similarity_matches_reference(kind, regional, alpha, tau):
  """Pairwise and matrix similarity against the reference's loop over sorted words."""
  _, codebook = _data(d=12)  # D=12: ASMK* packs 2 bytes per word, the last half empty
  codebook = codebook[:, :12].copy()
  rng = np.random.default_rng(3)
  ours_cfg = agg.AggregationConfig(aggregation_type=kind, codebook_size=16, alpha=alpha,
                                   tau=tau, use_regional_aggregation=regional,
                                   num_assignments=2)
  ref_cfg = ref.Config(codebook_size=16, feature_dimensionality=12,
                       aggregation_type=_REF_TYPE[kind], use_l2_normalization=ours_cfg.l2,
                       num_assignments=2, use_regional_aggregation=regional, alpha=alpha,
                       tau=tau)
  extractor, sim = ref.Extractor(ref_cfg, codebook), ref.Similarity(ref_cfg)
  images = []
  for i, n in enumerate([25, 3, 40, 0]):
    f = (codebook[rng.integers(0, 16, n)] + 0.5 * rng.normal(size=(n, 12))).astype(np.float32)
    counts = [n - n // 3, n // 3] if regional else None
    images.append((agg.aggregate(f, codebook, ours_cfg, counts),
                   extractor.extract(f, counts)))
  matrix = agg.similarity_matrix([a for a, _ in images], [a for a, _ in images], ours_cfg)
  for i, (a, ra) in enumerate(images):
    for j, (b, rb) in enumerate(images):
      want = sim.compute(ra[0], rb[0], ra[1], rb[1])
      np.testing.assert_allclose(agg.similarity(a, b, ours_cfg), want, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(matrix[i, j], want, rtol=1e-5, atol=1e-6)


def test_assignment_is_nearest_words_in_order():
  features, codebook = _data(4)
  words = agg.assign(features, codebook, 4, batch_size=9)
  d2 = ((features[:, None, :].astype(np.float64) - codebook[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(words, np.argsort(d2, axis=1, kind="stable")[:, :4])


def test_config_defaults_are_the_protos():
  c = agg.AggregationConfig()
  assert (c.aggregation_type, c.codebook_size, c.num_assignments, c.alpha, c.tau,
          c.use_regional_aggregation, c.l2) == ("asmk_star", 65536, 1, 3.0, 0.0, False, True)


@pytest.mark.parametrize("bad,match", [
    (dict(aggregation_type="fisher"), "aggregation_type"),
    (dict(codebook_size=0), "codebook_size"),
    (dict(codebook_size=4, num_assignments=5), "num_assignments"),
])
def test_bad_config_is_named(bad, match):
  with pytest.raises(ValueError, match=match):
    agg.AggregationConfig(**bad)


def test_bad_inputs_are_named():
  features, codebook = _data()
  with pytest.raises(ValueError, match="codebook has 16 words"):
    agg.aggregate(features, codebook, agg.AggregationConfig(codebook_size=8))
  cfg = agg.AggregationConfig(codebook_size=16, use_regional_aggregation=True)
  with pytest.raises(ValueError, match="num_features_per_region"):
    agg.aggregate(features, codebook, cfg, [1, 2])


def test_kmeans_is_lloyd_from_random_points():
  """Against plain Lloyd iterations (numpy, float64) from the same random data points."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(120, 6)).astype(np.float32)
  got = agg.kmeans(x, 5, iterations=4, seed=3)
  c = x[np.sort(np.random.default_rng(3).choice(120, 5, replace=False))].astype(np.float64)
  for _ in range(4):
    near = np.argmin(((x[:, None].astype(np.float64) - c[None]) ** 2).sum(-1), 1)
    c = np.stack([x[near == j].mean(0) if (near == j).any() else c[j] for j in range(5)])
  np.testing.assert_allclose(got, c, atol=1e-5)
  with pytest.raises(ValueError, match="at least as many"):
    agg.kmeans(x[:3], 4)
