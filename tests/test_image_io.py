"""Tests for image_io: every awkward file either decodes correctly or fails clearly."""
import numpy as np
from PIL import Image
import pytest

from retrieval_jax.data import image_io


def _gradient(w, h):
  x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
  y = np.linspace(0, 255, h, dtype=np.float64)[:, None].repeat(w, 1)
  return np.stack([x, y, 255 - x], -1).astype(np.uint8)


def test_plain_rgb_png_is_exact(tmp_path):
  arr = _gradient(33, 17)
  p = tmp_path / "a.png"
  Image.fromarray(arr).save(p)
  out = image_io.load_rgb(str(p))
  assert out.dtype == np.uint8 and out.shape == (17, 33, 3)
  np.testing.assert_array_equal(out, arr)


def test_truncated_jpeg_raises_with_path(tmp_path):
  p = tmp_path / "trunc.jpg"
  Image.fromarray(_gradient(256, 256)).save(p, quality=95)
  data = p.read_bytes()
  p.write_bytes(data[:len(data) // 2])
  with pytest.raises(image_io.ImageDecodeError) as e:
    image_io.load_rgb(str(p))
  assert str(p) in str(e.value)
  assert e.value.reason == "truncated"
  assert e.value.path == str(p)


def test_garbage_file_raises(tmp_path):
  p = tmp_path / "garbage.jpg"
  p.write_bytes(b"this is not an image at all" * 10)
  with pytest.raises(image_io.ImageDecodeError) as e:
    image_io.load_rgb(str(p))
  assert e.value.reason == "unidentified"


def test_cmyk_jpeg_becomes_rgb(tmp_path):
  rgb = _gradient(64, 48)
  cmyk = Image.fromarray(rgb).convert("CMYK")
  p = tmp_path / "cmyk.jpg"
  cmyk.save(p, quality=100)
  assert Image.open(p).mode == "CMYK"
  out = image_io.load_rgb(str(p))
  assert out.shape == (48, 64, 3)
  # JPEG loss only: the colours must be the original ones, not inverted.
  assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6


def test_grayscale_becomes_three_channels(tmp_path):
  g = _gradient(40, 30)[..., 0]
  p = tmp_path / "gray.png"
  Image.fromarray(g, mode="L").save(p)
  out = image_io.load_rgb(str(p))
  assert out.shape == (30, 40, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], g)


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
  v = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], np.uint16)
  p = tmp_path / "g16.png"
  Image.fromarray(v).save(p)
  assert Image.open(p).mode.startswith("I")
  out = image_io.load_rgb(str(p))
  expected = np.rint(v / 257.0).astype(np.uint8)
  np.testing.assert_array_equal(out[..., 0], expected)
  np.testing.assert_array_equal(out[..., 2], expected)
  assert out[0, 2, 0] == 128  # clipping would give 255


def test_palette_png_with_transparency(tmp_path):
  im = Image.new("P", (4, 2))
  im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
  im.putdata([0, 1, 0, 1, 1, 1, 0, 0])
  p = tmp_path / "pal.png"
  im.save(p, transparency=0)  # red pixels are transparent
  out = image_io.load_rgb(str(p))
  assert out.shape == (2, 4, 3)
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # over white background
  np.testing.assert_array_equal(out[0, 1], [0, 0, 255])
  out_black = image_io.load_rgb(str(p), background=(0, 0, 0))
  np.testing.assert_array_equal(out_black[0, 0], [0, 0, 0])


def test_rgba_png_composited(tmp_path):
  arr = np.zeros((2, 2, 4), np.uint8)
  arr[..., 0] = 200
  arr[0, 0, 3] = 255
  arr[0, 1, 3] = 0
  arr[1, :, 3] = 128
  p = tmp_path / "rgba.png"
  Image.fromarray(arr, "RGBA").save(p)
  out = image_io.load_rgb(str(p))
  np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
  assert 220 <= out[1, 0, 0] <= 235 and 120 <= out[1, 0, 1] <= 135


def _exif_jpeg(path, orientation, w=40, h=20):
  arr = np.zeros((h, w, 3), np.uint8)
  arr[:, : w // 4] = (255, 0, 0)  # red band on the stored left side
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=100)
  return arr


def test_exif_orientation_6_is_applied(tmp_path):
  p = tmp_path / "rot.jpg"
  _exif_jpeg(p, 6)
  out = image_io.load_rgb(str(p))
  # Orientation 6 = rotate 90 clockwise for display: the stored left becomes the top.
  assert out.shape == (40, 20, 3)
  assert out[:5, :, 0].mean() > 200 and out[-5:, :, 0].mean() < 50
  raw = image_io.load_rgb(str(p), exif_transpose=False)
  assert raw.shape == (20, 40, 3)


def test_bbx_is_in_stored_frame_before_exif(tmp_path):
  p = tmp_path / "rot.jpg"
  _exif_jpeg(p, 6)
  # Crop the stored left quarter (the red band), then orientation turns it.
  out = image_io.load_rgb(str(p), bbx=(0, 0, 10, 20))
  assert out.shape == (10, 20, 3)
  assert out[..., 0].mean() > 200


def test_bbx_crop_values(tmp_path):
  arr = _gradient(50, 40)
  p = tmp_path / "g.png"
  Image.fromarray(arr).save(p)
  out = image_io.load_rgb(str(p), bbx=(10.4, 5.6, 30.2, 25.0))
  np.testing.assert_array_equal(out, arr[6:25, 10:30])
  with pytest.raises(image_io.ImageDecodeError) as e:
    image_io.load_rgb(str(p), bbx=(60, 60, 70, 70))
  assert e.value.reason == "bad_bbx"


def test_extra_rotation(tmp_path):
  arr = _gradient(6, 4)
  p = tmp_path / "g.png"
  Image.fromarray(arr).save(p)
  out = image_io.load_rgb(str(p), rotate=90)
  assert out.shape == (6, 4, 3)
  np.testing.assert_array_equal(out, np.rot90(arr, k=-1))
  np.testing.assert_array_equal(image_io.load_rgb(str(p), rotate=180), arr[::-1, ::-1])


def test_one_pixel_image(tmp_path):
  p = tmp_path / "one.jpg"
  Image.new("RGB", (1, 1), (10, 200, 30)).save(p, quality=100)
  out = image_io.load_rgb(str(p))
  assert out.shape == (1, 1, 3)
  assert abs(int(out[0, 0, 1]) - 200) < 8


def test_very_wide_jpeg(tmp_path):
  p = tmp_path / "wide.jpg"
  Image.fromarray(np.tile(_gradient(200, 50), (1, 100, 1))).save(p, quality=90)
  out = image_io.load_rgb(str(p))
  assert out.shape == (50, 20000, 3)
  # Above max_pixels a JPEG is decoded at a reduced libjpeg scale, never at full size.
  small = image_io.load_rgb(str(p), max_pixels=250_000)
  assert small.shape == (25, 10000, 3)
  fast = image_io.load_rgb(str(p), max_size=5000)
  assert fast.shape[1] == 5000 and fast.shape[0] >= 6
  # The bbx follows the reduced scale.
  crop = image_io.load_rgb(str(p), bbx=(0, 0, 10000, 50), max_pixels=250_000)
  assert crop.shape == (25, 5000, 3)


def test_pixel_limit_raised_and_bomb_reported(tmp_path, monkeypatch):
  assert Image.MAX_IMAGE_PIXELS >= image_io.PIL_PIXEL_LIMIT
  p = tmp_path / "big.png"
  Image.new("RGB", (3000, 1000)).save(p)
  # Non-JPEG images over max_pixels cannot be decoded at a reduced size: clear error.
  with pytest.raises(image_io.ImageDecodeError) as e:
    image_io.load_rgb(str(p), max_pixels=1_000_000)
  assert e.value.reason == "too_large"
  # PIL's own bomb error (when a caller lowers PIL's limit) becomes ImageDecodeError.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
  with pytest.raises(image_io.ImageDecodeError) as e:
    image_io.load_rgb(str(p), max_pixels=None)
  assert e.value.reason == "too_large"


def test_missing_file_names_path(tmp_path):
  p = tmp_path / "nope" / "missing.jpg"
  with pytest.raises(FileNotFoundError) as e:
    image_io.load_rgb(str(p))
  assert str(p) in str(e.value)


def test_try_load_counts_skips(tmp_path):
  good = tmp_path / "good.png"
  Image.new("RGB", (3, 3)).save(good)
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
  counter = image_io.SkipCounter()
  assert image_io.try_load(str(good), counter=counter).shape == (3, 3, 3)
  assert image_io.try_load(str(bad), counter=counter) is None
  assert image_io.try_load(str(tmp_path / "missing.jpg"), counter=counter) is None
  assert counter.total == 2
  assert counter.counts["missing"] == 1
  assert sum(v for k, v in counter.counts.items() if k != "missing") == 1
  assert str(tmp_path / "missing.jpg") in counter.examples["missing"]
  assert "missing: 1" in counter.summary()
