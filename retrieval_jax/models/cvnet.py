"""CVNet global checkpoints (Lee et al., CVPR 2022; sungonce/CVNet) -> `RetrievalNet`.

The released `CVPR2022_CVNet_R50.pyth` / `_R101.pyth` hold `{"model_state": ...}` of
`CVNet_Rerank`: `encoder_q.*`, a pycls ResNet-50/101 (`stem.conv/bn`, `s{1-4}.b{j}.proj/bn`
(shortcut), `s{i}.b{j}.f.{a,b,c}` and `.f.{a,b,c}_bn`), its global head `encoder_q.head.pool.p`
(GeM) and `encoder_q.head.fc` (the 2048-d reduction), and the correlation re-ranker
(`conv2ds.*`, `cv_learner.*`), which is not a global network and is left out. A bare
`encoder_q` state dict (no prefix) is read too.

Mapping (as `cirtorch.py` does for cnnimageretrieval-pytorch): the trunk is renamed to
torchvision's names and converted by the ResNet converter, GeM p goes to `pool/p`, the
reduction to the whitening layer `whiten` (`model.whitening_dim` = its output size). The
pycls ResNet is torchvision's v1.5 (stride on the 3x3), but the networks take BGR images
normalised with the BGR-ordered ImageNet mean/std (OpenCV loading): the stem's input channels
are reversed here, so the converted network takes RGB with ImageNet's RGB mean/std, exactly.

Head: SuperGlobal (which runs on these weights) computes `fc(L2(GeM(x)))` then L2, which is
`RetrievalNet`'s pooling -> L2 -> whitening -> L2. CVNet's own test code omits the inner L2
(`fc(GeM(x))`); with the fc bias the two differ slightly.
"""
import re
from typing import Any, Dict, Mapping, Tuple

from absl import logging
import numpy as np

from retrieval_jax.models import backbones
from retrieval_jax.models import cirtorch
from retrieval_jax.models import weight_files

_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_BLOCK = re.compile(r"^s([1-4])\.b(\d+)\.(.*)$")
_TRANSFORM = {"f.a": "conv1", "f.a_bn": "bn1", "f.b": "conv2", "f.b_bn": "bn2", "f.c": "conv3",
              "f.c_bn": "bn3", "proj": "downsample.0", "bn": "downsample.1"}
_RERANKER = ("conv2ds.", "cv_learner.")


def _encoder(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  sd = weight_files.strip_prefix(state_dict)
  if any(k.startswith("encoder_q.") for k in sd):
    return {k[len("encoder_q."):]: np.asarray(v) for k, v in sd.items()
            if k.startswith("encoder_q.")}
  return {k: np.asarray(v) for k, v in sd.items() if not k.startswith(_RERANKER)}


def is_cvnet(obj: Any) -> bool:
  """Whether a loaded checkpoint is CVNet's (its `model_state`, or the state dict itself)."""
  if not isinstance(obj, Mapping):
    return False
  sd = obj.get("model_state", obj)
  return isinstance(sd, Mapping) and any(
      k.endswith("stem.conv.weight") and k.replace("stem.conv.weight", "head.fc.weight") in sd
      for k in sd)


def torchvision_names(trunk: Mapping[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray],
                                                                  Tuple[int, ...]]:
  """pycls ResNet names -> torchvision's, and the blocks per stage."""
  out, blocks = {}, [0, 0, 0, 0]
  for k, v in trunk.items():
    if k.startswith("stem."):
      layer, _, rest = k[len("stem."):].partition(".")
      out[f"{ {'conv': 'conv1', 'bn': 'bn1'}[layer] }.{rest}"] = v
      continue
    m = _BLOCK.match(k)
    if not m:
      raise ValueError(f"unexpected CVNet tensor {k!r}")
    stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    blocks[stage - 1] = max(blocks[stage - 1], block)
    name, _, leaf = rest.rpartition(".")
    if name not in _TRANSFORM:
      raise ValueError(f"unexpected CVNet tensor {k!r}")
    out[f"layer{stage}.{block - 1}.{_TRANSFORM[name]}.{leaf}"] = v
  return out, tuple(blocks)


def convert_cvnet(state_dict: Mapping[str, Any]) -> cirtorch.ImportedNetwork:
  """A CVNet `model_state` (or its `encoder_q`) -> `cirtorch.ImportedNetwork`.

  Raises:
    ValueError: tensors that are not a CVNet global network's.
  """
  sd = _encoder(state_dict)
  head = {k: v for k, v in sd.items() if k.startswith("head.")}
  trunk, blocks = torchvision_names({k: v for k, v in sd.items() if not k.startswith("head.")})
  if blocks not in _DEPTHS:
    raise ValueError(f"CVNet ResNet with {blocks} blocks per stage; expected one of "
                     f"{sorted(_DEPTHS.values())} ({list(_DEPTHS)})")
  depth = _DEPTHS[blocks]
  trunk["conv1.weight"] = np.ascontiguousarray(trunk["conv1.weight"][:, ::-1])  # BGR -> RGB
  backbone = f"resnet{depth}"
  converted = backbones.get_backbone(backbone).convert(trunk)
  unknown = sorted(set(head) - {"head.pool.p", "head.fc.weight", "head.fc.bias"})
  if unknown or "head.fc.weight" not in head or "head.pool.p" not in head:
    raise ValueError(f"CVNet global head should be head.pool.p and head.fc.weight/bias; got "
                     f"{sorted(head)}")
  p = np.asarray(head["head.pool.p"], np.float32).reshape(-1)
  w = np.asarray(head["head.fc.weight"], np.float32)  # torch Linear: [out, in]
  bias = np.asarray(head.get("head.fc.bias", np.zeros(w.shape[0])), np.float32)
  variables = {"params": {"backbone": converted["params"], "pool": {"p": p},
                          "whiten": {"kernel": np.ascontiguousarray(w.T), "bias": bias}},
               "batch_stats": {"backbone": converted["batch_stats"]}}
  return cirtorch.ImportedNetwork(
      variables=variables, backbone=backbone, pooling="gem", whitening_dim=int(w.shape[0]),
      mean=backbones.IMAGENET_MEAN, std=backbones.IMAGENET_STD,
      pooling_kwargs={"p_init": float(p.mean())}, meta={"depth": depth}, whitening={})


def load_cvnet(path: str, obj: Any = None) -> cirtorch.ImportedNetwork:
  """Reads a CVNet checkpoint (`torch.load(weights_only=True)`); see the module docstring."""
  obj = weight_files.read_torch_checkpoint(path) if obj is None else obj
  if not is_cvnet(obj):
    raise ValueError(f"{path} is not a CVNet checkpoint (expected 'model_state' with "
                     "encoder_q.stem.conv.weight and encoder_q.head.fc.weight)")
  net = convert_cvnet(weight_files.to_numpy_tree(obj.get("model_state", obj)))
  logging.info("CVNet global network %s: %s, GeM p %.3f, reduction to %d", path, net.backbone,
               net.pooling_kwargs["p_init"], net.whitening_dim)
  return net
