"""The evaluation input protocol: how a benchmark image becomes the network's input.

Published mAPs on Oxford/Paris (cnnimageretrieval-pytorch, "cirtorch", and the papers
that copy its `test.py`) depend on the exact input rule, so the reference's is the default
for every benchmark dataset; each deviation is one named switch (`config.extract.*`):

* `query_resize` "reference": a query is cropped from the whole image by its box and the
  crop is resized with the factor the whole image gets, i.e. bounded by
  `long_side * crop_long / full_long` (cirtorch `ImagesFromList.__getitem__`), so a 300 px
  crop of a 1024 px Oxford image stays ~300 px. "long_side": the crop itself is resized
  to `long_side` (our former rule).
* `upscale` False: images are only ever shrunk (cirtorch `imresize` = PIL `thumbnail`).
  True: smaller images are enlarged to `long_side` (our former rule).
* `resample` "lanczos": PIL LANCZOS (= the reference's `Image.ANTIALIAS`) through
  `thumbnail`. "bilinear": PIL's antialiased bilinear (our former filter).
* `exif_transpose` False for the benchmark datasets (cirtorch's `pil_loader`, DELF's
  `tf.io.decode_jpeg` and the revisitop scripts never apply the EXIF orientation, and the
  boxes are in the stored frame); True for user folders, the demo and Holidays (`"auto"`:
  each dataset's registered rule, `datasets.DatasetEntry.exif_transpose`).
* `multiscale_resize` "interpolate": the other scales are computed from the `long_side`
  input on the accelerator exactly as `F.interpolate(scale_factor=s, mode="bilinear",
  align_corners=False)` (`retrieval_jax/data/interpolate.py`). "decode": each scale is
  decoded again at `round(long_side * s)` (our former rule).

`REFERENCE` and `LEGACY` are the two complete settings; `from_switches` reads the
switches (the settings object of `descriptor_settings.py` calls it once).
"""
import dataclasses
from typing import Any, Optional, Tuple

import numpy as np

from retrieval_jax.data import datasets
from retrieval_jax.data import transforms

QUERY_RESIZES = ("reference", "long_side")
RESAMPLES = tuple(sorted(transforms.RESAMPLE))
MULTISCALE_RESIZES = ("interpolate", "decode")

@dataclasses.dataclass(frozen=True)
class EvalProtocol:
  """One complete evaluation input rule (see the module docstring for each field)."""
  query_resize: str = "reference"
  upscale: bool = False
  resample: str = "lanczos"
  exif_transpose: bool = False
  multiscale_resize: str = "interpolate"

  def __post_init__(self):
    for name, value, allowed in (("query_resize", self.query_resize, QUERY_RESIZES),
                                 ("resample", self.resample, RESAMPLES),
                                 ("multiscale_resize", self.multiscale_resize,
                                  MULTISCALE_RESIZES)):
      if value not in allowed:
        raise ValueError(f"extract.{name} must be one of {list(allowed)}, got {value!r}")

  def target_side(self, long_side: int, crop_long: Optional[int] = None,
                  full_long: Optional[int] = None) -> float:
    """Bound on the long side of an image (or a crop of a `full_long` image)."""
    if crop_long is not None and full_long and self.query_resize == "reference":
      return long_side * crop_long / full_long
    return float(long_side)

  def resize(self, image: np.ndarray, long_side: int,
             full_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """An image (or query crop) -> the network's input size under this rule.

    Args:
      image: [H, W, 3] uint8, the whole image or a crop of it.
      long_side: the evaluation size (the reference's `--image-size`).
      full_size: (width, height) of the whole image when `image` is a crop of it.

    Returns:
      [H', W', 3] uint8.
    """
    crop_long = max(image.shape[:2]) if full_size is not None else None
    target = self.target_side(long_side, crop_long,
                              max(full_size) if full_size is not None else None)
    if self.upscale:
      return transforms.resize_long_side(image, max(1, int(round(target))),
                                         resample=self.resample)
    return transforms.thumbnail(image, target, self.resample)


REFERENCE = EvalProtocol()
LEGACY = EvalProtocol(query_resize="long_side", upscale=True, resample="bilinear",
                      exif_transpose=True, multiscale_resize="decode")


def from_switches(switches: Any, dataset_name: str = "") -> EvalProtocol:
  """The protocol of `config.extract`'s switches for a dataset.

  Args:
    switches: `config.extract` (fields query_resize, upscale, resample, exif_transpose
      ("auto", True, False), multiscale_resize; an absent field keeps `EvalProtocol`'s
      value, the reference's).
    dataset_name: the described dataset; `exif_transpose="auto"` takes its registered
      rule (`datasets.DatasetEntry.exif_transpose`; True for a name not registered).

  Returns:
    An `EvalProtocol`.
  """
  get = switches.get if hasattr(switches, "get") else (
      lambda k, d=None: getattr(switches, k, d))
  exif = get("exif_transpose", "auto")
  if isinstance(exif, str):  # A str field: the command line gives "True" / "False".
    words = {"auto": None, "true": True, "false": False}
    if exif.lower() not in words:
      raise ValueError(f"extract.exif_transpose must be 'auto', True or False, got {exif!r}")
    exif = words[exif.lower()]
    if exif is None:
      exif = datasets.exif_transpose(dataset_name)
  given = {f.name: get(f.name) for f in dataclasses.fields(EvalProtocol)
           if f.name != "exif_transpose" and get(f.name) is not None}
  if "upscale" in given:
    given["upscale"] = bool(given["upscale"])
  return EvalProtocol(exif_transpose=bool(exif), **given)
