"""cnnimageretrieval-pytorch (cirtorch) checkpoints -> everything `RetrievalNet` needs.

A checkpoint is `{'state_dict', 'meta', ...}`: `features.*` (the trunk, renamed by
`torch_keys`), `pool.p` (GeM), `whiten.weight/bias` (the learned whitening layer) and the
`meta` dict (architecture, pooling, whitening, mean, std, outputdim, optionally the
precomputed whitening `Lw`). Regional (`pool.rpool`, R-MAC with regional whitening) and
local whitening (`lwhiten`) networks are refused: RetrievalNet has no such layers.
"""
import dataclasses
from typing import Any, Dict, Mapping, Tuple

from absl import logging
import numpy as np

from retrieval_jax.models import backbones
from retrieval_jax.models import torch_keys
from retrieval_jax.models import weight_files

_CIRTORCH_ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                           "vgg16")
_CIRTORCH_POOLINGS = ("mac", "spoc", "gem", "rmac")


@dataclasses.dataclass
class ImportedNetwork:
  """A released network converted for `RetrievalNet`.

  Attributes:
    variables: {"params": {"backbone", "pool" (GeM p), "whiten" (Dense)}, "batch_stats"}.
    backbone, pooling, whitening_dim, mean, std: the `RetrievalNet` attributes that match
      (config.model.backbone / pooling / whitening_dim; mean / std as in the meta).
    pooling_kwargs: e.g. {"p_init": p} for GeM, so that a fresh init equals the file.
    meta: the checkpoint's meta dict (tensors as numpy).
    whitening: the precomputed learned whitenings of `meta['Lw']`, as
      {dataset: {"ss" | "ms": (m [D], P [D, D])}} (apply with `whitening.apply_whitening`);
      empty when the file has none.
  """
  variables: Dict[str, Any]
  backbone: str
  pooling: str
  whitening_dim: int
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]
  pooling_kwargs: Dict[str, Any]
  meta: Dict[str, Any]
  whitening: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]]


def convert_cirtorch(state_dict: Mapping[str, Any], meta: Mapping[str, Any]) -> ImportedNetwork:
  """A cirtorch `state_dict` + `meta` -> `ImportedNetwork`.

  Args:
    state_dict: key -> array (`features.*`, `pool.p`, `whiten.weight`, `whiten.bias`).
    meta: cirtorch's meta dict ('architecture', 'pooling', 'whitening', 'mean', 'std',
      'outputdim', optionally 'regional', 'local_whitening', 'Lw').
  Raises:
    ValueError: an architecture, pooling or layer RetrievalNet does not have.
  """
  sd = {k: np.asarray(v) for k, v in weight_files.strip_prefix(state_dict).items()}
  arch = str(meta.get("architecture", ""))
  if arch not in _CIRTORCH_ARCHITECTURES:
    raise ValueError(f"cirtorch architecture {arch!r} is not supported; supported: "
                     f"{_CIRTORCH_ARCHITECTURES}")
  if meta.get("regional") or any(k.startswith("pool.rpool.") for k in sd):
    raise ValueError("regional (R-pooled, regionally whitened) cirtorch networks are not "
                     "supported: RetrievalNet has no regional whitening layer")
  if meta.get("local_whitening") or any(k.startswith("lwhiten.") for k in sd):
    raise ValueError("cirtorch networks with local whitening ('lwhiten') are not supported")
  pooling = str(meta.get("pooling", "gem"))
  if pooling not in _CIRTORCH_POOLINGS:
    raise ValueError(f"cirtorch pooling {pooling!r} is not supported ({_CIRTORCH_POOLINGS})")

  features = {k: v for k, v in sd.items() if k.startswith("features.")}
  if arch.startswith("resnet"):
    trunk = backbones.get_backbone(arch).convert(
        torch_keys.cirtorch_resnet_state_dict(features))
  else:
    trunk = backbones.get_backbone(arch).convert(features)  # VGG: torchvision's features.N
  params: Dict[str, Any] = {"backbone": trunk["params"]}
  variables = {"params": params}
  if trunk.get("batch_stats"):
    variables["batch_stats"] = {"backbone": trunk["batch_stats"]}
  pooling_kwargs: Dict[str, Any] = {}
  if pooling == "gem":
    if "pool.p" not in sd:
      raise ValueError("cirtorch GeM network without 'pool.p'")
    p = np.asarray(sd["pool.p"], np.float32).reshape(-1)
    params["pool"] = {"p": p}
    pooling_kwargs = {"p_init": float(p.mean())}
    if p.size != 1:
      pooling_kwargs["per_channel"] = True
  whitening_dim = 0
  if "whiten.weight" in sd:
    w = np.asarray(sd["whiten.weight"], np.float32)  # torch Linear: [out, in]
    params["whiten"] = {"kernel": np.ascontiguousarray(w.T),
                        "bias": np.asarray(sd.get("whiten.bias", np.zeros(w.shape[0])),
                                           np.float32)}
    whitening_dim = int(w.shape[0])
  elif meta.get("whitening"):
    raise ValueError("meta says whitening=True but the state dict has no 'whiten.weight'")
  used = set(features) | {"pool.p", "whiten.weight", "whiten.bias"}
  left = [k for k in sd if k not in used and not k.endswith("num_batches_tracked")]
  if left:
    raise ValueError(f"cirtorch checkpoint holds tensors we do not convert: {left[:8]}")

  lw: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]] = {}
  for dataset, entry in (meta.get("Lw") or {}).items():
    for kind in ("ss", "ms"):
      if isinstance(entry, Mapping) and kind in entry:
        lw.setdefault(str(dataset), {})[kind] = (
            np.asarray(entry[kind]["m"], np.float64).reshape(-1),
            np.asarray(entry[kind]["P"], np.float64))
  mean = tuple(float(v) for v in meta.get("mean", backbones.IMAGENET_MEAN))
  std = tuple(float(v) for v in meta.get("std", backbones.IMAGENET_STD))
  return ImportedNetwork(variables=variables, backbone=arch, pooling=pooling,
                         whitening_dim=whitening_dim, mean=mean, std=std,
                         pooling_kwargs=pooling_kwargs, meta=dict(meta), whitening=lw)


def is_cirtorch(obj: Any) -> bool:
  """Whether a loaded checkpoint is a cirtorch one ('state_dict' + 'meta' with 'architecture')."""
  return (isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping)
          and "architecture" in obj["meta"] and "state_dict" in obj)


def load_cirtorch(path: str, obj: Any = None) -> ImportedNetwork:
  """Reads a cnnimageretrieval-pytorch checkpoint (e.g. retrievalSfM120k-resnet101-gem-*.pth).

  `torch.load(weights_only=True)`; the optimiser state and other entries are ignored.

  Args:
    path: the `.pth` file.
    obj: the already loaded checkpoint, if the caller has it.
  """
  obj = weight_files.read_torch_checkpoint(path) if obj is None else obj
  if not is_cirtorch(obj):
    raise ValueError(f"{path} is not a cnnimageretrieval-pytorch checkpoint "
                     "(expected keys 'state_dict' and 'meta' with an 'architecture')")
  net = convert_cirtorch(weight_files.to_numpy_tree(obj["state_dict"]),
                         weight_files.to_numpy_tree(obj["meta"]))
  logging.info("cirtorch network %s: %s-%s, whitening %d, mean %s std %s%s", path,
               net.backbone, net.pooling, net.whitening_dim, net.mean, net.std,
               f", precomputed Lw for {sorted(net.whitening)}" if net.whitening else "")
  return net


def check_model_matches(net: ImportedNetwork, backbone: str, pooling: str,
                        whitening_dim: int) -> None:
  """Raises a ValueError naming the config fields to set when they disagree with `net`."""
  want = {"model.backbone": (backbone, net.backbone), "model.pooling": (pooling, net.pooling),
          "model.whitening_dim": (int(whitening_dim), net.whitening_dim)}
  bad = {k: v for k, v in want.items() if v[0] != v[1]}
  if bad:
    fix = " ".join(f"--config.{k}={v[1]}" for k, v in bad.items())
    raise ValueError(f"the checkpoint is {net.backbone}-{net.pooling} with whitening "
                     f"{net.whitening_dim}; the config disagrees: {bad}. Set: {fix}")
