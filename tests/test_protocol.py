"""The evaluation input protocol equals cnnimageretrieval-pytorch's (issue 11).

Every expected value comes from `tests/cirtorch_reference.py` (torch + PIL transcriptions of
the reference loader and `extract_ms`), never from our own `load_rgb` / resize functions.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest
import torch

from retrieval_jax import extract
from retrieval_jax import multiscale
from retrieval_jax import sharding
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import image_io
from retrieval_jax.data import interpolate
from retrieval_jax.data import protocol
from retrieval_jax.data import transforms
from retrieval_jax.evaluation import query_expansion as rerank
from retrieval_jax.models import retrieval_net

sys.path.insert(0, os.path.dirname(__file__))
import cirtorch_reference as ref  # pylint: disable=g-import-not-at-top,wrong-import-position

skimage_data = pytest.importorskip("skimage.data")
PHOTO_DIR = os.path.dirname(skimage_data.__file__)
ROCKET = os.path.join(PHOTO_DIR, "rocket.jpg")      # 640 x 427 JPEG photograph.
CHELSEA = os.path.join(PHOTO_DIR, "chelsea.png")    # 451 x 300 PNG photograph.


_rescale = jax.jit(interpolate.rescale_batch_like_torch, static_argnums=(2, 3))


def _load(path, long_side, bbx=None, proto=protocol.REFERENCE):
  buckets = transforms.square_buckets(long_side)
  image, _ = grain_pipeline.load_eval_image(path, long_side=long_side, buckets=buckets,
                                            bbox=bbx, protocol=proto)
  return image


def _ref_pixels(path, imsize, bbx=None):
  return np.asarray(ref.images_from_list_item(path, imsize, bbx))


# ---------------------------------------------------------------------------------------
# Loader: query crops, never enlarge, LANCZOS, EXIF.


@pytest.mark.parametrize("path,bbx", [
    (ROCKET, (100.4, 30.6, 400.5, 380.2)),   # A 300 x 350 crop of a 640 px photo.
    (ROCKET, (0, 0, 640, 427)),              # The whole image as a box.
    (CHELSEA, (60.7, 20.1, 300.2, 290.9)),
])
@pytest.mark.parametrize("imsize", [256, 1024])
def test_query_crop_of_a_real_photo_equals_the_reference(path, bbx, imsize):
  want = _ref_pixels(path, imsize, bbx)
  got = _load(path, imsize, bbx)
  assert got.shape == want.shape
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_query_crop_keeps_the_whole_image_scale():
  # 1024 is larger than the photo: the reference leaves the crop at its own size (x1),
  # our former rule enlarged it to 1024 (x3.4).
  bbx = (100, 30, 400, 380)
  got = _load(ROCKET, 1024, bbx)
  assert got.shape[:2] == (350, 300) == _ref_pixels(ROCKET, 1024, bbx).shape[:2]
  legacy = _load(ROCKET, 1024, bbx, protocol.LEGACY)
  assert max(legacy.shape[:2]) == 1024
  # At 320 px the whole image halves, and so does the crop: 350 * 320 / 640 = 175.
  assert _load(ROCKET, 320, bbx).shape[:2] == (175, 150)


@pytest.mark.parametrize("imsize", [200, 639, 640, 2000])
def test_database_images_equal_the_reference_and_are_never_enlarged(imsize):
  want = _ref_pixels(ROCKET, imsize)
  got = _load(ROCKET, imsize)
  assert got.shape == want.shape
  assert max(got.shape[:2]) == min(imsize, 640)
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_reference_filter_is_lanczos_and_the_former_one_is_kept_behind_a_switch():
  want = _ref_pixels(ROCKET, 300).astype(int)
  lanczos = _load(ROCKET, 300).astype(int)
  bilinear = _load(ROCKET, 300, proto=protocol.EvalProtocol(resample="bilinear")).astype(int)
  assert np.abs(lanczos - want).max() <= 1
  assert bilinear.shape == want.shape
  assert np.abs(bilinear - want).mean() > 0.3  # A real difference the switch selects.


def test_box_reaching_past_the_image_is_padded_black_as_pil_crop(tmp_path):
  path = str(tmp_path / "rocket_small.png")
  Image.open(ROCKET).resize((160, 107)).save(path)
  bbx = (120.0, 80.3, 190.0, 130.0)  # Past the right and bottom edges.
  want = _ref_pixels(path, 64, bbx)
  got = _load(path, 64, bbx)
  assert got.shape == want.shape
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  raw = image_io.load_rgb(path, bbx)
  assert raw.shape == (50, 70, 3) and not raw[-10:].any() and not raw[:, -10:].any()


def _exif_photo(path, orientation=6):
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.open(ROCKET).resize((120, 80)).save(path, exif=exif.tobytes(), quality=95)


def test_benchmarks_ignore_exif_user_folders_apply_it(tmp_path):
  path = str(tmp_path / "exif6.jpg")
  _exif_photo(path)
  want = _ref_pixels(path, 100)  # The reference never reads the orientation tag.
  assert want.shape[:2] == (67, 100)
  got = _load(path, 100, proto=protocol.from_switches({}, "roxford5k"))
  assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
  user = _load(path, 100, proto=protocol.from_switches({}, "my_photos"))
  assert user.shape[:2] == (100, 67)  # Turned upright.
  forced = _load(path, 100, proto=protocol.from_switches({"exif_transpose": False}, "demo"))
  assert forced.shape[:2] == (67, 100)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_equal_pil_exif_transpose(tmp_path, orientation):
  path = str(tmp_path / f"o{orientation}.jpg")
  _exif_photo(path, orientation)
  with Image.open(path) as im:
    want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  np.testing.assert_array_equal(image_io.load_rgb(path), want)


def test_protocol_switches_from_config_and_bad_values():
  p = protocol.from_switches({"query_resize": "long_side", "upscale": True,
                            "resample": "bilinear", "exif_transpose": True,
                            "multiscale_resize": "decode"})
  assert p == protocol.LEGACY
  assert protocol.from_switches({}, "rparis6k") == protocol.REFERENCE
  with pytest.raises(ValueError, match="extract.resample"):
    protocol.from_switches({"resample": "bicubic"})
  with pytest.raises(ValueError, match="extract.exif_transpose"):
    protocol.from_switches({"exif_transpose": "yes"})
  with pytest.raises(ValueError, match="extract.query_resize"):
    protocol.EvalProtocol(query_resize="crop")


# ---------------------------------------------------------------------------------------
# Multi-scale: F.interpolate(scale_factor=s, bilinear, align_corners=False) on the device.


def _padded(images, shape):
  n = len(images)
  out = np.zeros((n,) + shape + (3,), np.float32)
  mask = np.zeros((n,) + shape, bool)
  for r, im in enumerate(images):
    h, w = im.shape[:2]
    out[r, :h, :w] = im
    mask[r, :h, :w] = True
  return out, mask


@pytest.mark.parametrize("scale", [0.5, 2 ** -0.5, 0.25, 0.3, 1.5, 2 ** 0.5])
@pytest.mark.parametrize("recompute", [False, True])
def test_rescale_batch_equals_torch_interpolate(scale, recompute):
  rng = np.random.default_rng(0)
  sizes = [(37, 50), (50, 23), (50, 50), (9, 4)]
  images = [rng.uniform(0, 255, s + (3,)).astype(np.float32) for s in sizes]
  x, mask = _padded(images, (50, 50))
  x[~mask] = 1e4  # Padding must never leak into a valid pixel.
  out, out_mask = _rescale(jnp.asarray(x), jnp.asarray(mask), scale, recompute)
  out, out_mask = np.asarray(out), np.asarray(out_mask)
  for r, im in enumerate(images):
    t = torch.from_numpy(im).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(
        t, scale_factor=scale, mode="bilinear", align_corners=False,
        recompute_scale_factor=recompute)[0].permute(1, 2, 0).numpy()
    h, w = want.shape[:2]
    assert out_mask[r].sum() == h * w and out_mask[r, :h, :w].all()
    np.testing.assert_allclose(out[r, :h, :w], want, rtol=0, atol=2e-3)
    assert not out[r][~out_mask[r]].any()


def test_rescale_by_one_is_the_input_and_empty_rows_stay_empty():
  x = jnp.ones((2, 8, 8, 3), jnp.uint8)
  mask = jnp.zeros((2, 8, 8), bool).at[0].set(True)
  out, m = interpolate.rescale_batch_like_torch(x, mask, 1.0)
  assert out.dtype == jnp.float32 and np.array_equal(np.asarray(m), np.asarray(mask))
  out, m = _rescale(x, mask, 0.5, False)
  assert out.shape == (2, 4, 4, 3) and np.asarray(m)[0].all() and not np.asarray(m)[1].any()
  with pytest.raises(ValueError, match="scale"):
    interpolate.rescale_batch_like_torch(x, mask, 0.0)


def test_multiscale_inputs_of_a_real_photo_equal_the_reference_tensors():
  ms = (1.0, 2 ** -0.5, 0.5)
  imsize = 160
  want = ref.multiscale_inputs(ref.input_tensor(ROCKET, imsize), ms)
  batch = next(grain_pipeline.eval_batches([ROCKET], long_side=imsize, batch_size=1))
  mean = np.asarray(ref.IMAGENET_MEAN, np.float32) * 255
  std = np.asarray(ref.IMAGENET_STD, np.float32) * 255
  for s, w in zip(ms, want):
    out, m = _rescale(jnp.asarray(batch["image"]), jnp.asarray(batch["mask"]), s, False)
    w = w[0].permute(1, 2, 0).numpy()
    h, wd = w.shape[:2]
    assert np.asarray(m)[0].sum() == h * wd
    got = (np.asarray(out)[0, :h, :wd] - mean) / std  # The model's normalisation.
    np.testing.assert_allclose(got, w, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------
# alpha-DBA: dba_k counts the image itself (the paper's n_DBA neighbours = dba_k - 1).


def test_dba_k_counts_the_image_itself_as_the_papers_n_plus_one():
  rng = np.random.default_rng(3)
  db = rng.normal(size=(12, 6))
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  n_dba, alpha = 2, 3.0
  # TPAMI 2018: "a weighted sum of itself and its top n_DBA ranked images", weights
  # (x.d)^alpha, itself with weight (x.x)^alpha = 1; transcribed with plain numpy.
  sims = db @ db.T
  want = np.empty_like(db)
  for r in range(len(db)):
    order = [j for j in np.argsort(-sims[r]) if j != r][:n_dba]
    v = db[r] + sum(max(sims[r, j], 0) ** alpha * db[j] for j in order)
    want[r] = v / np.linalg.norm(v)
  got = rerank.alpha_database_augmentation(db.astype(np.float32), n_dba + 1, alpha)
  np.testing.assert_allclose(got, want, atol=1e-5)
  off_by_one = rerank.alpha_database_augmentation(db.astype(np.float32), n_dba, alpha)
  assert np.abs(off_by_one - want).max() > 1e-3


# ---------------------------------------------------------------------------------------
# Multi-scale extraction end to end: cirtorch's extract_ms around our network.


def _tiny_gem_net(p=2.5):
  model = retrieval_net.RetrievalNet(
      backbone="resnet18", backbone_kwargs={"width": 8, "stage_sizes": (1, 1, 1, 1)},
      pooling="gem")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  variables["params"]["pool"]["p"] = np.full_like(variables["params"]["pool"]["p"], p)
  return model, variables


def test_multiscale_descriptors_equal_cirtorch_extract_ms_around_our_network():
  model, variables = _tiny_gem_net()
  scales = (1.0, 2 ** -0.5, 0.5)
  paths, bboxes, imsize = [ROCKET, CHELSEA], [None, (60.7, 20.1, 300.2, 290.9)], 160
  mean = torch.tensor(ref.IMAGENET_MEAN)[:, None, None]
  std = torch.tensor(ref.IMAGENET_STD)[:, None, None]
  apply = jax.jit(lambda v, x: model.apply(v, x)["descriptor"])

  def net(t):  # [1, 3, H, W] normalised -> [1, D]; our model normalises 0..255 itself.
    pixels = ((t[0] * std + mean) * 255).permute(1, 2, 0).numpy()[None]
    return torch.from_numpy(np.array(apply(variables, pixels)))

  msp = ref.multiscale_p("gem", regional=False, whitening=False, p=2.5, num_scales=3)
  want = np.stack([ref.extract_ms(net, ref.input_tensor(p, imsize, b), scales, msp).numpy()
                   for p, b in zip(paths, bboxes)])
  mesh = sharding.make_mesh(devices=jax.devices()[:min(8, jax.device_count())])
  p = multiscale.multiscale_p_from(variables, "gem", model.pooling)
  assert p == pytest.approx(msp)
  got = extract.extract_descriptors(model, variables, paths, mesh=mesh, long_side=imsize,
                                    scales=scales, multiscale_p=p, bboxes=bboxes)
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("pooling,whiten", [("gem", False), ("gem", True), ("regional", False),
                                            ("rmac", False), ("mac", False)])
def test_multiscale_p_is_the_reference_msp(pooling, whiten):
  params = {"pool": {"p": np.asarray([2.5], np.float32)}}
  if whiten:
    params["whiten"] = {"kernel": np.eye(2), "bias": np.zeros(2)}
  want = ref.multiscale_p(pooling, regional=pooling in ("regional", "rmac"), whitening=whiten,
                          p=2.5, num_scales=3)
  got = multiscale.multiscale_p_from({"params": params}, "gem", pooling)
  assert (1.0 if got is None else got) == pytest.approx(want)
