"""Published weights by name: `--config.model.pretrained=name:<model>`.

One table (`MODELS`) of the checkpoints users know: cnnimageretrieval-pytorch's networks
(the `PRETRAINED` table of cirtorch's `examples/test_e2e.py` / `test.py`: VGG16-GeM,
ResNet50/101/152-GeM, with the whitening layer where released) and the torchvision
ImageNet trunks. Each file name carries the leading hex digits of the file's SHA-256
(torch.hub's convention, checked as `torch.hub.check_hash` does).

`fetch(name)`:
  1. `<cache>/<name>.npz` (converted) exists: use it, no network;
  2. else download the URL into `<cache>/downloads/<file>` (resumable `.part`, via
     `data.transfer.download_file`), verify the SHA-256 prefix (a mismatch deletes the
     file and raises `ChecksumError`);
  3. convert: a torchvision trunk becomes our trunk `.npz` (`weight_files.save_npz`, loads
     without torch); a cirtorch network keeps its verified `.pth`, which
     `pretrained.load_pretrained_into` reads whole (trunk, GeM p, whitening layer, mean/std
     and the precomputed `meta['Lw']`), so the returned path is the `.pth`.
With no network, one line says which URL to fetch by hand and where to put it.

The cache is `$RETRIEVAL_JAX_CACHE`, default `~/.cache/retrieval_jax`.
"""
import dataclasses
import os
import re
from typing import Dict, Optional

from absl import logging

from retrieval_jax import errors
from retrieval_jax.data import transfer
from retrieval_jax.models import pretrained
from retrieval_jax.models import weight_files

PREFIX = "name:"
CACHE_ENV = "RETRIEVAL_JAX_CACHE"
_CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks"
_TORCHVISION = "https://download.pytorch.org/models"
_HASH = re.compile(r"-([a-f0-9]+)\.")


@dataclasses.dataclass(frozen=True)
class HubModel:
  """A published weight file.

  Attributes:
    url: where it is published; its file name ends in `-<sha256 prefix>.<ext>`.
    kind: "cirtorch" (a whole retrieval network) or "trunk" (torchvision ImageNet trunk).
    backbone, pooling, whitening_dim: the `config.model` fields that match it.
  """
  url: str
  kind: str
  backbone: str
  pooling: str = "gem"
  whitening_dim: int = 0

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[1]

  @property
  def sha256_prefix(self) -> str:
    match = _HASH.search(self.filename)
    if not match:
      raise ValueError(f"{self.filename} carries no SHA-256 prefix")
    return match.group(1)


def _cirtorch(path: str, backbone: str, whitening_dim: int = 0) -> HubModel:
  return HubModel(f"{_CIRTORCH}/{path}", "cirtorch", backbone, "gem", whitening_dim)


def _trunk(file: str, backbone: str) -> HubModel:
  return HubModel(f"{_TORCHVISION}/{file}", "trunk", backbone, "gem", 0)


MODELS: Dict[str, HubModel] = {
    # cirtorch, retrieval-SfM-120k (TPAMI 2018); their learned whitening is in meta['Lw'].
    "retrievalSfM120k-vgg16-gem": _cirtorch(
        "retrieval-SfM-120k/retrievalSfM120k-vgg16-gem-b4dcdc6.pth", "vgg16"),
    "retrievalSfM120k-resnet101-gem": _cirtorch(
        "retrieval-SfM-120k/retrievalSfM120k-resnet101-gem-b80fb85.pth", "resnet101"),
    # cirtorch, whitening learned end-to-end (a 2048 -> 2048 layer).
    "rSfM120k-tl-resnet50-gem-w": _cirtorch(
        "retrieval-SfM-120k/rSfM120k-tl-resnet50-gem-w-97bf910.pth", "resnet50", 2048),
    "rSfM120k-tl-resnet101-gem-w": _cirtorch(
        "retrieval-SfM-120k/rSfM120k-tl-resnet101-gem-w-a155e54.pth", "resnet101", 2048),
    "rSfM120k-tl-resnet152-gem-w": _cirtorch(
        "retrieval-SfM-120k/rSfM120k-tl-resnet152-gem-w-f39cada.pth", "resnet152", 2048),
    "gl18-tl-resnet50-gem-w": _cirtorch("gl18/gl18-tl-resnet50-gem-w-83fdc30.pth",
                                        "resnet50", 2048),
    "gl18-tl-resnet101-gem-w": _cirtorch("gl18/gl18-tl-resnet101-gem-w-a4d43db.pth",
                                         "resnet101", 2048),
    "gl18-tl-resnet152-gem-w": _cirtorch("gl18/gl18-tl-resnet152-gem-w-21278d5.pth",
                                         "resnet152", 2048),
    # torchvision ImageNet trunks (IMAGENET1K_V1).
    "imagenet-resnet18": _trunk("resnet18-f37072fd.pth", "resnet18"),
    "imagenet-resnet34": _trunk("resnet34-b627a593.pth", "resnet34"),
    "imagenet-resnet50": _trunk("resnet50-0676ba61.pth", "resnet50"),
    "imagenet-resnet101": _trunk("resnet101-63fe2227.pth", "resnet101"),
    "imagenet-resnet152": _trunk("resnet152-394f9c45.pth", "resnet152"),
    "imagenet-vgg16": _trunk("vgg16-397923af.pth", "vgg16"),
    "imagenet-mobilenet_v2": _trunk("mobilenet_v2-b0353104.pth", "mobilenet_v2"),
}


class OfflineError(errors.UserError, RuntimeError):
  """The weights are not cached and cannot be downloaded (its message says where to put
  the file: main.py shows only it, exit code 2)."""


def cache_dir() -> str:
  """`$RETRIEVAL_JAX_CACHE`, default `~/.cache/retrieval_jax`."""
  return os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/retrieval_jax")


def is_hub_name(spec: str) -> bool:
  return isinstance(spec, str) and spec.startswith(PREFIX)


def get(name: str, models: Optional[Dict[str, HubModel]] = None) -> HubModel:
  table = MODELS if models is None else models
  if name not in table:
    raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(table))}")
  return table[name]


def check_sha256_prefix(path: str, prefix: str) -> None:
  """Raises `transfer.ChecksumError` (and deletes `path`) unless its SHA-256 starts so."""
  digest = transfer.digest(path, "sha256")
  if not digest.startswith(prefix.lower()):
    os.remove(path)
    raise transfer.ChecksumError(
        f"{path}: SHA-256 {digest[:len(prefix)]}... does not start with {prefix} (the "
        "prefix its published name carries); the file was removed, fetch it again")


def converted_path(name: str, model: HubModel, cache: str) -> str:
  """Where `fetch` keeps the usable file of `name`."""
  if model.kind == "cirtorch":
    return os.path.join(cache, "downloads", model.filename)
  return os.path.join(cache, f"{name}.npz")


def fetch(name: str, *, cache: Optional[str] = None,
          models: Optional[Dict[str, HubModel]] = None, retries: int = 2,
          timeout: float = 60.0, retry_wait: float = 1.0) -> str:
  """The local, verified, converted weight file of a published model (see the docstring).

  Args:
    name: a key of `MODELS` (or of `models`).
    cache: cache folder (default `cache_dir()`).
    models: a table to use instead of `MODELS` (tests serve files locally).
    retries, timeout, retry_wait: of the download (each retry resumes the `.part`).
  Returns:
    A path for `pretrained.load_pretrained_into` / `load_backbone_variables`.
  Raises:
    OfflineError: not cached and not downloadable; the message names the URL and where
      to put the file.
    transfer.ChecksumError: the downloaded file's SHA-256 does not match (file removed).
  """
  model = get(name, models)
  cache = cache or cache_dir()
  out = converted_path(name, model, cache)
  if os.path.exists(out):
    return out
  raw = os.path.join(cache, "downloads", model.filename)
  if not os.path.exists(raw):
    try:
      transfer.download_file(model.url, raw, retries=retries, timeout=timeout,
                             retry_wait=retry_wait)
    except transfer.DownloadError as e:
      raise OfflineError(
          f"cannot download pretrained model {name!r} ({e}); fetch {model.url} by hand "
          f"and put it at {raw}") from e
  check_sha256_prefix(raw, model.sha256_prefix)
  if model.kind == "cirtorch":
    return raw
  trunk = pretrained.load_backbone_variables(model.backbone, raw)
  tmp = out + ".tmp.npz"
  weight_files.save_npz(trunk, tmp)
  os.replace(tmp, out)
  logging.info("pretrained %s: %s verified and converted to %s", name, model.filename, out)
  return out


def resolve(spec: str, **kwargs) -> str:
  """`name:<model>` -> `fetch(<model>)`; anything else is returned unchanged."""
  if is_hub_name(spec):
    return fetch(spec[len(PREFIX):], **kwargs)
  return spec
