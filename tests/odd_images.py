"""The odd-image set of the reliability tests: every kind of file a real collection holds.

`write(folder)` writes them and returns {name: path}; `UNREADABLE` are the names every mode
must skip (named in the log and the skipped list), the others must give finite descriptors.
The large ones are cheap: the 40000 x 40000 "bomb" is a PNG header claiming that size over
a tiny body, the 12000 x 9000 JPEG is flat grey (a few hundred KB).
"""
import io
import os
import struct
import zlib
from typing import Dict

import numpy as np
from PIL import Image

UNREADABLE = ("truncated.jpg", "zero_byte.jpg", "text.jpg", "bomb.png", "missing.jpg")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
  """A PNG whose header claims width x height RGB pixels (a decompression bomb), tiny body."""
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  body = zlib.compress(b"\x00" * 64)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
          + _png_chunk(b"IEND", b""))


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y = np.linspace(0, 255, h)[:, None, None]
  x = np.linspace(0, 255, w)[None, :, None]
  base = np.concatenate([np.broadcast_to(y, (h, w, 1)), np.broadcast_to(x, (h, w, 1)),
                         np.full((h, w, 1), 128.)], -1)
  return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def write(folder: str, seed: int = 0) -> Dict[str, str]:
  """Writes the odd images into `folder`; {file name: path} (missing.jpg is not written)."""
  os.makedirs(folder, exist_ok=True)
  p = {name: os.path.join(folder, name) for name in (
      "truncated.jpg", "zero_byte.jpg", "text.jpg", "bomb.png", "missing.jpg", "cmyk.jpg",
      "grey16.png", "palette_transparent.png", "rgba.png", "exif_rotated.jpg",
      "one_pixel.png", "wide_6000x2.png", "huge_12000x9000.jpg", "png_named.jpg",
      "plain.jpg")}
  full = io.BytesIO()
  Image.fromarray(_rgb(48, 64, seed)).save(full, "JPEG", quality=90)
  with open(p["truncated.jpg"], "wb") as f:
    f.write(full.getvalue()[:len(full.getvalue()) // 3])
  open(p["zero_byte.jpg"], "wb").close()
  with open(p["text.jpg"], "w") as f:
    f.write("this is a text file, not a photo\n")
  with open(p["bomb.png"], "wb") as f:
    f.write(bomb_png())
  Image.fromarray(_rgb(40, 56, seed + 1)).convert("CMYK").save(p["cmyk.jpg"], "JPEG")
  grey = (np.linspace(0, 65535, 48 * 40).reshape(40, 48)).astype(np.uint16)
  Image.fromarray(grey).save(p["grey16.png"])
  pal = Image.fromarray(_rgb(40, 40, seed + 2)).convert("P", palette=Image.Palette.ADAPTIVE)
  pal.info["transparency"] = 0
  pal.save(p["palette_transparent.png"], transparency=0)
  rgba = np.concatenate([_rgb(36, 52, seed + 3), np.full((36, 52, 1), 128, np.uint8)], -1)
  Image.fromarray(rgba, "RGBA").save(p["rgba.png"])
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(_rgb(30, 60, seed + 4)).save(p["exif_rotated.jpg"], "JPEG", exif=exif)
  Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(p["one_pixel.png"])
  Image.fromarray(_rgb(2, 6000, seed + 5)).save(p["wide_6000x2.png"])
  Image.new("RGB", (12000, 9000), (120, 130, 140)).save(p["huge_12000x9000.jpg"], "JPEG",
                                                        quality=50)
  Image.fromarray(_rgb(44, 44, seed + 6)).save(p["png_named.jpg"], "PNG")
  Image.fromarray(_rgb(50, 70, seed + 7)).save(p["plain.jpg"], "JPEG")
  return p
