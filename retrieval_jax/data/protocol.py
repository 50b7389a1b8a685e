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
  boxes are in the stored frame); True for user folders and the demo (`"auto"`).
* `multiscale_resize` "interpolate": the other scales are computed from the `long_side`
  input on the accelerator exactly as `F.interpolate(scale_factor=s, mode="bilinear",
  align_corners=False)` (`retrieval_jax/data/interpolate.py`). "decode": each scale is
  decoded again at `round(long_side * s)` (our former rule).

`REFERENCE` and `LEGACY` are the two complete settings; `from_config` reads the switches.
"""
import dataclasses
from typing import Any, Optional, Tuple

import numpy as np

from retrieval_jax.data import transforms

QUERY_RESIZES = ("reference", "long_side")
RESAMPLES = tuple(sorted(transforms.RESAMPLE))
MULTISCALE_RESIZES = ("interpolate", "decode")

# Datasets read by reference code that never applies the EXIF orientation (cirtorch's test
# and whitening sets, revisitop, DELF's GLDv2 scripts), with the "+1m" variants. Any other
# name (the demo, a user folder, Holidays, whose loader documents that EXIF is applied)
# keeps it.
_NO_EXIF_DATASETS = frozenset({
    "roxford5k", "rparis6k", "oxford5k", "paris6k", "roxford5k+1m", "rparis6k+1m",
    "revisitop1m", "gldv2", "ukbench", "retrieval-sfm-120k", "retrieval-sfm-30k",
})


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


def exif_default(dataset_name: str) -> bool:
  """`exif_transpose="auto"`: False for the benchmark datasets, True for anything else."""
  return dataset_name not in _NO_EXIF_DATASETS


def from_config(extract_config: Any, dataset_name: str = "") -> EvalProtocol:
  """The protocol of `config.extract` for a dataset (absent fields: the reference).

  Args:
    extract_config: `config.extract` (fields query_resize, upscale, resample,
      exif_transpose ("auto", True, False), multiscale_resize).
    dataset_name: the evaluated dataset, for `exif_transpose="auto"`.

  Returns:
    An `EvalProtocol`.
  """
  get = extract_config.get if hasattr(extract_config, "get") else (
      lambda k, d: getattr(extract_config, k, d))
  exif = get("exif_transpose", "auto")
  if isinstance(exif, str):  # A str field: the command line gives "True" / "False".
    words = {"auto": None, "true": True, "false": False}
    if exif.lower() not in words:
      raise ValueError(f"extract.exif_transpose must be 'auto', True or False, got {exif!r}")
    exif = words[exif.lower()]
    if exif is None:
      exif = exif_default(dataset_name)
  return EvalProtocol(query_resize=get("query_resize", REFERENCE.query_resize),
                      upscale=bool(get("upscale", REFERENCE.upscale)),
                      resample=get("resample", REFERENCE.resample),
                      exif_transpose=bool(exif),
                      multiscale_resize=get("multiscale_resize",
                                            REFERENCE.multiscale_resize))
