"""DELG as the reference code does it (tensorflow/models research/delf), rule by rule.

Every expected value here comes from a transcription of the reference (numpy, TF, torch or
scipy/skimage as the reference calls them), never from retrieval_jax's own functions:

* the local grid: layer3 subsampled by a 1x1 stride-2 max-pool (`resnet50.py`
  `block3_strides`), boxes as `feature_extractor.CalculateReceptiveBoxes`;
* the attention head with its BatchNorm (`delf_model.AttentionModel`, Keras layers);
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as tr  # pylint: disable=g-import-not-at-top,wrong-import-position

from retrieval_jax.local import heads
from retrieval_jax.local import keypoints as kp_lib
from retrieval_jax.local import model as model_lib
from retrieval_jax.local import receptive_field as rf_lib
from retrieval_jax.models import resnet

tf = pytest.importorskip("tensorflow")


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
