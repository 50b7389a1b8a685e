"""Independent transcriptions of cnnimageretrieval-pytorch's evaluation input (test-only).

Written from the reference's source, line by line, with torch and PIL only (torchvision has
no CPU wheel here, so `transforms.ToTensor` / `Normalize` are spelled out):

* `cirtorch/datasets/datahelpers.py`: `pil_loader` (open, `convert('RGB')`, no EXIF) and
  `imresize` (`img.thumbnail((imsize, imsize), Image.ANTIALIAS)`; ANTIALIAS is LANCZOS,
  the name Pillow 10 removed).
* `cirtorch/datasets/genericdataset.py` `ImagesFromList.__getitem__`: the whole image's
  long side is remembered, the query box is cropped, and the crop is resized with
  `imresize(img, imsize * max(img.size) / imfullsize)`.
* `cirtorch/networks/imageretrievalnet.py` `extract_ms`: scale 1 is the input itself,
  every other scale is `nn.functional.interpolate(input, scale_factor=s, mode='bilinear',
  align_corners=False)` of the normalised [1, 3, H, W] tensor; the per-scale descriptors
  are averaged as `(mean(v^msp))^(1/msp)` and L2-normalised.
* `cirtorch/examples/test.py`: `msp = net.pool.p` only for plain GeM pooling without
  regional pooling or whitening, else 1.

Nothing here imports retrieval_jax.
"""
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pil_loader(path: str) -> Image.Image:
  with open(path, "rb") as f:
    img = Image.open(f)
    return img.convert("RGB")


def imresize(img: Image.Image, imsize: float) -> Image.Image:
  img.thumbnail((imsize, imsize), Image.LANCZOS)
  return img


def images_from_list_item(path: str, imsize: Optional[int],
                          bbx: Optional[Sequence[float]] = None) -> Image.Image:
  """`ImagesFromList(root='', images=[path], imsize, bbxs=[bbx])[0]` before the transform."""
  img = pil_loader(path)
  imfullsize = max(img.size)
  if bbx is not None:
    img = img.crop(bbx)
  if imsize is not None:
    if bbx is not None:
      img = imresize(img, imsize * max(img.size) / imfullsize)
    else:
      img = imresize(img, imsize)
  return img


def to_tensor(img: Image.Image) -> torch.Tensor:
  """torchvision `ToTensor` of an RGB PIL image: float [3, H, W] in [0, 1]."""
  arr = np.asarray(img, dtype=np.uint8)
  return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
  """torchvision `Normalize` of a [3, H, W] tensor."""
  m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
  s = torch.tensor(std, dtype=x.dtype)[:, None, None]
  return (x - m) / s


def input_tensor(path: str, imsize: int, bbx=None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD) -> torch.Tensor:
  """The [1, 3, H, W] tensor that `extract_vectors` gives the network for one image."""
  return normalize(to_tensor(images_from_list_item(path, imsize, bbx)), mean, std)[None]


def multiscale_inputs(x: torch.Tensor, ms: Sequence[float]):
  """The tensors `extract_ms` gives the network, one per scale (its `input` is x)."""
  out = []
  for s in ms:
    if s == 1:
      out.append(x.clone())
    else:
      out.append(nn.functional.interpolate(x, scale_factor=s, mode="bilinear",
                                           align_corners=False))
  return out


def extract_ms(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               ms: Sequence[float], msp: float) -> torch.Tensor:
  """`extract_ms`: `net` maps [1, 3, H, W] to a [1, D] descriptor."""
  v = None
  for input_t in multiscale_inputs(x, ms):
    d = net(input_t).pow(msp).squeeze()
    v = d if v is None else v + d
  v = v / len(ms)
  v = v.pow(1. / msp)
  return v / v.norm()


def multiscale_p(pooling: str, regional: bool, whitening: bool, p: float,
                 num_scales: int) -> float:
  """test.py's msp."""
  if num_scales > 1 and pooling == "gem" and not regional and not whitening:
    return p
  return 1.0
