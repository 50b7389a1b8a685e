"""DELG as the reference code does it (tensorflow/models research/delf), rule by rule.

Every expected value here comes from a transcription of the reference (numpy, TF, torch or
scipy/skimage as the reference calls them), never from retrieval_jax's own functions:

* the local grid: layer3 subsampled by a 1x1 stride-2 max-pool (`resnet50.py`
  `block3_strides`), boxes as `feature_extractor.CalculateReceptiveBoxes`;
* the attention head with its BatchNorm (`delf_model.AttentionModel`, Keras layers);
* the input: PIL load and `ResizeImage`, `tf.image.resize` pyramid levels
  (`export_model_utils.ExtractLocalFeatures`), locations / scale_factors (`extractor.py`);
* matching (distance 1.0, no ratio test), RANSAC 20 px, the raw (inliers, global score)
  order and junk per protocol (`delg/perform_retrieval.py`, `image_reranking.py`);
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as tr  # pylint: disable=g-import-not-at-top,wrong-import-position

from retrieval_jax import evaluation
from retrieval_jax.evaluation import rerankers
from retrieval_jax.local import delg_input
from retrieval_jax.local import geometric_rerank
from retrieval_jax.local import heads
from retrieval_jax.local import keypoints as kp_lib
from retrieval_jax.local import model as model_lib
from retrieval_jax.local import receptive_field as rf_lib
from retrieval_jax.models import resnet

tf = pytest.importorskip("tensorflow")

TINY = {"width": 4, "stage_sizes": (1, 1, 1, 1)}


def _tf_receptive_boxes(height, width, rf, stride, padding):
  """`feature_extractor.CalculateReceptiveBoxes`, transcribed in TF."""
  x, y = tf.meshgrid(tf.range(width), tf.range(height))
  coordinates = tf.reshape(tf.stack([y, x], axis=2), [-1, 2])
  point_boxes = tf.cast(tf.concat([coordinates, coordinates], 1), dtype=tf.float32)
  bias = [-padding, -padding, -padding + rf - 1, -padding + rf - 1]
  return (stride * point_boxes + bias).numpy()


# ----------------------------------------------------------------------------------------------
# 1. The stride-32 local grid.


def test_resnet50_local_grid_is_stride_32_with_reference_boxes():
  """A ResNet-50 DELG on 64x96 images: the local head sees a 2x3 grid (layer3's 4x6
  subsampled by 2), keypoints sit on the reference's box centres (rf 291, stride 32,
  padding 145: centre of position i at 32 * i), and our boxes are the reference formula
  at the torchvision trunk's own window (267, 32, 133)."""
  model = model_lib.DelfNet(backbone="resnet50", backbone_kwargs={"width": 4}, reduced_dim=8,
                            attention_hidden=8)
  images = np.random.default_rng(0).integers(0, 255, (1, 64, 96, 3), np.uint8)
  masks = np.ones((1, 64, 96), bool)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, masks)
  out = jax.jit(model.apply)(variables, images, masks)
  assert out["attention"].shape == (1, 2, 3)
  rf = model_lib.local_receptive_field(model)
  assert (rf.size, rf.stride, rf.padding) == (267, 32, 133)
  np.testing.assert_array_equal(rf_lib.receptive_boxes(2, 3, rf),
                                _tf_receptive_boxes(2, 3, 267.0, 32.0, 133.0))
  ref = _tf_receptive_boxes(2, 3, 291.0, 32.0, 145.0)
  ref_centres = (ref[:, :2] + ref[:, 2:]) / 2.0
  select = kp_lib.make_select_fn(model, None, 6)
  rec = kp_lib.keypoints_of_batch(select, variables, images, masks, rf=rf, scales=(1.0,),
                                  score_threshold=-1.0, max_features=6)[0]
  got = sorted(map(tuple, rec["locations"].tolist()))
  assert got == sorted(map(tuple, ref_centres.tolist()))


def test_block3_strides_trunk_matches_torch():
  """`model.local_block3_strides`: layer3 subsampled [::2, ::2] feeds layer4 at stride 1
  (the reference's layout), against torchvision's modules run that way."""
  torch.manual_seed(0)
  net = tr.randomize_batch_norm(tr.ResNet(50, width=4), seed=0).eval()
  x = np.random.default_rng(1).uniform(0, 1, (1, 96, 64, 3)).astype(np.float32)
  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    t = net.maxpool(net.relu(net.bn1(net.conv1(t))))
    t3 = net.layer3(net.layer2(net.layer1(t)))[:, :, ::2, ::2]
    net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    t4 = net.layer4(t3)
  variables = resnet.convert_torchvision_resnet(net.state_dict(), 50)
  out = resnet.ResNet(depth=50, width=4, block3_strides=True).apply(variables, jnp.asarray(x))
  for got, want in ((out["stages"][0], t3), (out["feature_map"], t4)):
    want = want.permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape == (1, 3, 2, want.shape[-1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  rf = model_lib.local_receptive_field(model_lib.DelfNet(
      backbone="resnet50", backbone_kwargs={"block3_strides": True}))
  assert (rf.size, rf.stride, rf.padding) == (267, 32, 133)


# ----------------------------------------------------------------------------------------------
# 2. The attention head with BatchNorm.


def _keras_attention(params, stats, hidden):
  """`delf_model.AttentionModel`'s layers (conv1 -> bn_conv1 -> relu -> conv2 -> softplus)."""
  conv1 = tf.keras.layers.Conv2D(hidden, 1, padding="same")
  bn = tf.keras.layers.BatchNormalization(axis=3)
  conv2 = tf.keras.layers.Conv2D(1, 1, padding="same")
  c = params["conv1"]["kernel"].shape[2]
  conv1.build((None, None, None, c))
  bn.build((None, None, None, hidden))
  conv2.build((None, None, None, hidden))
  conv1.set_weights([params["conv1"]["kernel"], params["conv1"]["bias"]])
  bn.set_weights([params["bn_conv1"]["scale"], params["bn_conv1"]["bias"], stats["mean"],
                  stats["var"]])
  conv2.set_weights([params["conv2"]["kernel"], params["conv2"]["bias"]])

  def call(x, training):
    y = tf.nn.relu(bn(conv1(x), training=training))
    return tf.math.softplus(conv2(y))[..., 0].numpy()
  return call, bn


def test_attention_head_batch_norm_matches_keras():
  """Inference (running statistics) and training (batch statistics, and the updated
  running averages with Keras' momentum 0.99) against the Keras layers."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  head = heads.AttentionHead(hidden=5)
  variables = head.init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  params["bn_conv1"] = {"scale": rng.uniform(0.5, 1.5, 5).astype(np.float32),
                        "bias": rng.normal(size=5).astype(np.float32)}
  stats = {"mean": rng.normal(size=5).astype(np.float32),
           "var": rng.uniform(0.5, 2.0, 5).astype(np.float32)}
  v = {"params": params, "batch_stats": {"bn_conv1": stats}}
  keras_call, keras_bn = _keras_attention(params, stats, 5)
  prob, _ = head.apply(v, x)
  np.testing.assert_allclose(prob, keras_call(x, False), rtol=1e-5, atol=1e-6)
  (prob, _), updates = head.apply(v, x, None, True, mutable=["batch_stats"])
  np.testing.assert_allclose(prob, keras_call(x, True), rtol=1e-4, atol=1e-5)
  new = updates["batch_stats"]["bn_conv1"]
  np.testing.assert_allclose(new["mean"], keras_bn.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], keras_bn.moving_variance.numpy(), rtol=1e-5,
                             atol=1e-6)


def test_attention_head_without_batch_norm_keeps_old_layout():
  """`model.local_attention_bn=False`: the head of checkpoints written before the BatchNorm
  (conv1 and conv2 only, no batch statistics)."""
  x = jnp.ones((1, 2, 2, 4))
  v = heads.AttentionHead(hidden=3, batch_norm=False).init(jax.random.PRNGKey(0), x)
  assert set(v["params"]) == {"conv1", "conv2"} and "batch_stats" not in v


# ----------------------------------------------------------------------------------------------
# 4. DELG's input: PIL load and size bound, tf.image.resize pyramid levels.


def test_pyramid_levels_are_tf_image_resize():
  """Every level of a padded batch row = `tf.image.resize` (bilinear, no antialiasing) of
  the float image to round(size * scale), for down- and up-scaling."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (37, 53, 3), np.uint8)
  batch = np.zeros((2, 60, 60, 3), np.uint8)
  masks = np.zeros((2, 60, 60), bool)
  batch[0, :37, :53], masks[0, :37, :53] = image, True
  for scale in (0.25, 0.35355338, 0.70710677, 1.4142135, 2.0):
    level, level_mask = delg_input.pyramid_level(batch, masks, scale)
    size = tf.cast(tf.round(tf.constant([37.0, 53.0]) * scale), tf.int32)
    want = tf.image.resize(tf.constant(image, tf.float32)[None], size)[0].numpy()
    h, w = want.shape[:2]
    np.testing.assert_allclose(level[0, :h, :w], want, rtol=1e-5, atol=1e-3)
    assert level_mask[0].sum() == h * w and level_mask[0, :h, :w].all()
    assert not level_mask[1].any()


def _delg_resize_image(image, max_image_size):
  """`examples/extractor.py: ResizeImage` (min_image_size -1, no square output)."""
  height, width = image.shape[:2]
  largest_side = max(width, height)
  if max_image_size >= 0 and largest_side > max_image_size:
    scale_factor = max_image_size / largest_side
  else:
    return image, np.ones(2, dtype=float)
  new_shape = (int(round(width * scale_factor)), int(round(height * scale_factor)))
  scale_factors = np.array([new_shape[1] / height, new_shape[0] / width], dtype=float)
  resized = np.array(Image.fromarray(image).resize(new_shape, resample=Image.BILINEAR))
  return resized, scale_factors


def test_images_load_and_shrink_as_delg(tmp_path):
  """A database image and a query crop: `delg/extract_features.py` (PIL load, crop by the
  rounded box, `resize_factor = crop long / full long`) then `ResizeImage`."""
  rng = np.random.default_rng(0)
  path = str(tmp_path / "a.png")
  full = rng.integers(0, 255, (90, 150, 3), np.uint8)
  Image.fromarray(full).save(path)
  got, factors = delg_input.load_image(path, 100)
  want, want_factors = _delg_resize_image(np.array(Image.open(path).convert("RGB")), 100)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(factors, want_factors)
  bbx = (10.4, 5.6, 90.5, 70.2)
  got, factors = delg_input.load_image(path, 100, bbox=bbx)
  pil_im = Image.open(path).convert("RGB")
  original = max(pil_im.size)
  pil_im = pil_im.crop([int(round(b)) for b in bbx])
  want, want_factors = _delg_resize_image(np.array(pil_im), 100 * max(pil_im.size) / original)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(factors, want_factors)
  small, ones = delg_input.load_image(path, 400)  # never enlarged
  assert small.shape == full.shape and np.all(ones == 1.0)


# ----------------------------------------------------------------------------------------------
# 5. Keypoints in the pixels of the image as loaded.


def test_keypoints_in_original_pixels(tmp_path):
  """A 150x90 image bounded to 100 px: stored locations = the reference's box centres of
  the resized image (`CalculateReceptiveBoxes / scale`) divided by `scale_factors`."""
  rng = np.random.default_rng(0)
  path = str(tmp_path / "a.png")
  Image.fromarray(rng.integers(0, 255, (90, 150, 3), np.uint8)).save(path)
  model = model_lib.DelfNet(backbone="resnet18", backbone_kwargs=TINY, reduced_dim=8,
                            attention_hidden=8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.uint8))
  rf = model_lib.local_receptive_field(model)
  (_, rec), = list(kp_lib.extract_keypoints(
      model, variables, [path], rf=rf, mesh=None, long_side=100, scales=(0.5, 1.0),
      score_threshold=-1.0, max_features=1000, batch_size=1))
  resized, factors = _delg_resize_image(np.array(Image.open(path).convert("RGB")), 100)
  assert resized.shape[:2] == (60, 100)
  want = []
  for scale in (0.5, 1.0):
    h, w = (int(v) for v in tf.round(tf.constant([60.0, 100.0]) * scale))
    fh, fw = -(-h // rf.stride), -(-w // rf.stride)
    boxes = _tf_receptive_boxes(fh, fw, float(rf.size), float(rf.stride),
                                float(rf.padding)) / scale
    want.append((boxes[:, :2] + boxes[:, 2:]) / 2.0 / factors)
  want = np.concatenate(want)
  got = rec["locations"]
  assert len(got) == len(want)
  np.testing.assert_allclose(sorted(map(tuple, got)), sorted(map(tuple, want)), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 6-8. Matching, the (inliers, global score) order, junk per protocol: DELG's
# perform_retrieval.py with image_reranking.py, transcribed.


def _ref_match_features(query_locations, query_descriptors, index_image_locations,
                        index_image_descriptors, ransac_seed=None,
                        feature_distance_threshold=0.9, ransac_residual_threshold=10.0):
  """`image_reranking.MatchFeatures` (no ratio test); skimage >= 0.23 names the seed `rng`."""
  from scipy import spatial  # pylint: disable=g-import-not-at-top
  from skimage import measure, transform  # pylint: disable=g-import-not-at-top
  num_features_query = query_locations.shape[0]
  num_features_index_image = index_image_locations.shape[0]
  if not num_features_query or not num_features_index_image:
    return 0
  index_image_tree = spatial.cKDTree(index_image_descriptors)
  _, indices = index_image_tree.query(
      query_descriptors, distance_upper_bound=feature_distance_threshold)
  query_locations_to_use = np.array([
      query_locations[i,] for i in range(num_features_query)
      if indices[i] != num_features_index_image])
  index_image_locations_to_use = np.array([
      index_image_locations[indices[i],] for i in range(num_features_query)
      if indices[i] != num_features_index_image])
  if query_locations_to_use.shape[0] <= 3:
    return 0
  _, inliers = measure.ransac(
      (index_image_locations_to_use, query_locations_to_use), transform.AffineTransform,
      min_samples=3, residual_threshold=ransac_residual_threshold, max_trials=1000,
      rng=ransac_seed)
  if inliers is None:
    inliers = []
  return sum(inliers)


def _ref_rerank(input_ranks, initial_scores, query, index, junk_ids, num_to_rerank_max):
  """`RerankByGeometricVerification` with DELG's arguments (seed 0, 1.0, 20 px)."""
  num_index_images = len(index)
  input_ranks_for_gv = [ind for ind in input_ranks if ind not in junk_ids]
  num_to_rerank = min(num_to_rerank_max, len(input_ranks_for_gv))
  inliers_and_initial_scores = [[0, initial_scores[i]] for i in range(num_index_images)]
  for i in range(num_to_rerank):
    index_image_id = input_ranks_for_gv[i]
    inliers_and_initial_scores[index_image_id][0] = _ref_match_features(
        query["locations"], query["descriptors"], index[index_image_id]["locations"],
        index[index_image_id]["descriptors"], ransac_seed=0, feature_distance_threshold=1.0,
        ransac_residual_threshold=20.0)
  return sorted(range(num_index_images), key=lambda k: (inliers_and_initial_scores[k][0],
                                                        inliers_and_initial_scores[k][1]),
                reverse=True), [x[0] for x in inliers_and_initial_scores]


def _ref_parse_easy_medium_hard(ground_truth):
  """`dataset.ParseEasyMediumHardGroundTruth`."""
  easy, medium, hard = [], [], []
  for g in ground_truth:
    easy.append({"ok": g["easy"], "junk": np.concatenate([g["junk"], g["hard"]])})
    medium.append({"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]})
    hard.append({"ok": g["hard"], "junk": np.concatenate([g["junk"], g["easy"]])})
  return easy, medium, hard


def _planted_world():
  """One query and 6 database images sharing 0, 5, 40, 0, 25, 12 features with it under an
  affine map (2 px noise): a 5-inlier image (below the old threshold of 15) and planted
  easy / hard / junk images, so the Medium and Hard heads of 3 differ."""
  rng = np.random.default_rng(0)
  dim, n = 32, 60

  def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  q_loc = rng.uniform(0, 500, (n, 2)).astype(np.float32)
  query = {"locations": q_loc, "descriptors": unit(rng.normal(size=(n, dim)))}
  a = np.array([[0.9, 0.1], [-0.05, 1.1]])
  index = []
  for shared in (0, 5, 40, 0, 25, 12):
    loc = rng.uniform(0, 500, (n, 2))
    desc = unit(rng.normal(size=(n, dim)))
    pick = rng.choice(n, shared, replace=False)
    loc[:shared] = q_loc[pick] @ a.T + 30 + rng.normal(0, 2, (shared, 2))
    desc[:shared] = unit(query["descriptors"][pick] + 0.05 * rng.normal(size=(shared, dim)))
    index.append({"locations": loc.astype(np.float32), "descriptors": desc})
  scores = np.array([0.9, 0.5, 0.3, 0.4, 0.2, 0.8])  # global order 0, 5, 1, 3, 2, 4
  gnd = [{"easy": np.array([5]), "hard": np.array([2, 4]), "junk": np.array([0])}]
  return query, index, scores, gnd


def test_rerank_per_protocol_matches_perform_retrieval():
  """Matching within distance 1.0 (no ratio test), affine RANSAC 20 px seeded 0, raw
  (inliers, global score) order, each protocol's junk: our `rerank_setups` = the
  reference's re-ranking, per protocol, and Medium differs from Hard."""
  query, index, scores, gnd = _planted_world()
  input_ranks = np.argsort(-scores)
  ranks = input_ranks[:, None]
  easy, medium, hard = _ref_parse_easy_medium_hard(gnd)
  verify = dict(matcher="distance", max_distance=1.0, model="affine", backend="skimage",
                residual_threshold=20.0, max_trials=1000, seed=0)
  got, inliers = geometric_rerank.rerank_setups(
      ranks, lambda j: query, lambda i: index[i],
      junk_by_setup=rerankers.junk_by_setup({"gnd": gnd}, 1), top_n=3, verify_kwargs=verify,
      num_threads=1)
  want = {}
  for name, setup in (("easy", easy), ("medium", medium), ("hard", hard)):
    order, ref_inliers = _ref_rerank(input_ranks, scores, query, index,
                                     set(setup[0]["junk"].tolist()), 3)
    want[name] = order
    np.testing.assert_array_equal(got[name][:, 0], order, err_msg=name)
    np.testing.assert_array_equal(inliers[name][0], ref_inliers, err_msg=name)
  assert list(want["medium"]) != list(want["hard"])
  assert want["medium"][:2] == [5, 1]  # 12 and 5 inliers: raw counts, no threshold
  assert want["hard"][0] == 2          # the easy image 5 is junk for Hard: 2 gets verified


def test_revisited_evaluator_scores_each_protocol_with_its_ranking():
  """A re-ranking with per-protocol rankings: Easy/Hard mAP come from their own ranking
  (the revisitop formula on that ranking), Medium from `ranks`."""
  _, _, scores, gnd = _planted_world()
  medium = np.argsort(-scores)[:, None]
  hard = np.array([2, 1, 0, 5, 3, 4])[:, None]
  ranking = evaluation.Ranking(medium, per_setup={"medium": medium, "hard": hard})
  got = evaluation.EVALUATORS.get("roxford5k").score("roxford5k", ranking, {"gnd": gnd})
  _, _, ref_hard = _ref_parse_easy_medium_hard(gnd)
  # Hard: ok {2, 4}, junk {0, 5}: ranks of the positives with junk removed: 2 -> 0, 4 -> 3.
  assert ref_hard[0]["ok"].tolist() == [2, 4]
  # revisitop's compute_ap (trapezoid): positive j at rank r adds ((j / r or 1) + (j + 1) /
  # (r + 1)) / 2 / n_positives.
  want_ap = ((1.0 + 1.0) / 2 + (1.0 / 3 + 2.0 / 4) / 2) / 2
  assert got["mAP_H"] == pytest.approx(round(100 * want_ap, 2))
  assert got["mAP_M"] == evaluation.evaluate_revisited("x", medium, gnd)["mAP_M"]


# ----------------------------------------------------------------------------------------------
# 10. ASMK ranks the whole database by default, apart from local re-ranking's top 100.


def test_asmk_ranks_the_whole_database_by_default():
  """HOW/ASMK protocol: `eval.rerank=asmk` asks for the full ranking (asmk_top=-1, so the
  pipeline's global stage keeps every database image), local re-ranking its top 100."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from retrieval_jax.evaluation import pipeline  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  c.eval.rerank = "asmk"
  assert (c.eval.asmk_top, c.eval.asmk_codebook_dataset) == (-1, "")
  assert pipeline.stages_of(c).rerank_top == -1
  c.eval.rerank = "local"
  assert pipeline.stages_of(c).rerank_top == 100
  c.eval.rerank, c.eval.asmk_top = "asmk", 100
  assert pipeline.stages_of(c).rerank_top == 100


# ----------------------------------------------------------------------------------------------
# 11 (part). The exported descriptor is the evaluated one.


def test_export_whitening_follows_eval_whitening():
  from configs import common  # pylint: disable=g-import-not-at-top
  from retrieval_jax.modes import export as export_mode  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  assert c.export.whitening == "auto" and not export_mode.bakes_whitening(c)
  c.eval.whitening = "learned"
  assert export_mode.bakes_whitening(c)
  c.export.whitening = "False"
  assert not export_mode.bakes_whitening(c)
  c.export.whitening = "maybe"
  with pytest.raises(ValueError, match="export.whitening must be"):
    export_mode.bakes_whitening(c)
