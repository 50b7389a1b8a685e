"""Backbone registry and weight import from files a user has on disk.

Weights are converted once from PyTorch layouts to our param trees; `main` saves them as
`.npz`, which later loads without torch. The preprocessing belongs to the weights, so each
backbone records its input mean/std. Supported files:

* torchvision state dicts (`resnet*`, `vgg16`, `mobilenet_v2`);
* timm ResNets: plain timm `resnet18/34/50/101/152` (7x7 stem, conv shortcut: the
  `resnet50.a1_in1k` / `.tv_in1k` kind) use torchvision's names exactly (`conv1`, `bn1`,
  `layer1.0.conv1`, ..., `layer1.0.downsample.0/1`, `fc`; the activations hold no weights),
  so the torchvision converters read them; the deep-stem / average-pool-shortcut variants
  (`resnet50d`, `resnet50c`, ...) are refused with a clear error. Hub files in
  `.safetensors` are read by a small numpy reader (no pickle at all);
* cnnimageretrieval-pytorch (cirtorch) checkpoints, `{'state_dict', 'meta', ...}`:
  `features.*` (ResNet: features.0 = conv1, .1 = bn1, .4-.7 = layer1-4; VGG: torchvision's
  `features.N`), `pool.p` (GeM), `whiten.weight/bias` (the learned whitening layer) and the
  `meta` dict (architecture, pooling, whitening, mean, std, outputdim, optionally the
  precomputed whitening `Lw`). `load_cirtorch` returns everything `RetrievalNet` needs.
  Regional (`pool.rpool`, R-MAC with regional whitening) and local whitening (`lwhiten`)
  networks are refused: RetrievalNet has no such layers.
* Keras `.h5` files are not read (h5py is not a dependency): convert them to a torchvision
  state dict or `.npz` elsewhere.

Security: `.pth` files are read with `torch.load(weights_only=True)`, which refuses arbitrary
pickled objects; cirtorch's `meta['Lw']` holds numpy arrays, so `read_torch_checkpoint`
allows exactly numpy's array/scalar reconstruction (data, no code) on top of that.
"""
import dataclasses
import json
import os
import struct
import zipfile
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from absl import logging
import numpy as np
from flax import traverse_util

from retrieval_jax import errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build a trunk by name and convert its torch weights."""
  make: Callable[..., Any]             # (**kwargs) -> flax Module honouring layers.py's contract
  convert: Callable[[Mapping[str, np.ndarray]], Dict[str, Any]]  # state dict -> variables
  channels: int                        # channels of "feature_map"
  mean: Tuple[float, float, float] = IMAGENET_MEAN
  std: Tuple[float, float, float] = IMAGENET_STD


def _mobilenet_v2():
  from retrieval_jax.models import mobilenet_v2  # pylint: disable=import-outside-toplevel
  return BackboneSpec(mobilenet_v2.MobileNetV2,
                      mobilenet_v2.convert_torchvision_mobilenet_v2, 1280)


def _resnet(depth):
  def spec():
    from retrieval_jax.models import resnet  # pylint: disable=import-outside-toplevel
    return BackboneSpec(lambda **kw: resnet.ResNet(depth=depth, **kw),
                        lambda sd: resnet.convert_torchvision_resnet(sd, depth),
                        512 if depth < 50 else 2048)
  return spec


def _vgg16():
  from retrieval_jax.models import vgg  # pylint: disable=import-outside-toplevel
  return BackboneSpec(vgg.VGG16, vgg.convert_torchvision_vgg16, 512)


def _efficientnet_lite0():
  from retrieval_jax.models import efficientnet_lite  # pylint: disable=import-outside-toplevel
  # RetrievalNet normalises `(images / 255 - mean) / std`: TF's (x - 127) / 128 on 0..255 RGB.
  mean = tuple(m / 255.0 for m in efficientnet_lite.INPUT_MEAN)
  std = tuple(s / 255.0 for s in efficientnet_lite.INPUT_STD)
  return BackboneSpec(efficientnet_lite.EfficientNetLite0,
                      efficientnet_lite.convert_efficientnet_lite0,
                      efficientnet_lite.EfficientNetLite0.out_features, mean, std)


# Lazily imported, so a config only pays for the trunk it uses.
_BACKBONES: Dict[str, Callable[[], BackboneSpec]] = {
    "mobilenet_v2": _mobilenet_v2,
    "resnet18": _resnet(18), "resnet34": _resnet(34), "resnet50": _resnet(50),
    "resnet101": _resnet(101), "resnet152": _resnet(152),
    "vgg16": _vgg16,
    "efficientnet_lite0": _efficientnet_lite0,
}


def register_backbone(name: str, spec_fn: Callable[[], BackboneSpec]) -> None:
  _BACKBONES[name] = spec_fn


def get_backbone(name: str) -> BackboneSpec:
  if name not in _BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; known: {sorted(_BACKBONES)}")
  return _BACKBONES[name]()


def backbone_names():
  return sorted(_BACKBONES)


def _numpy_safe_globals():
  """numpy's array / scalar reconstruction, for `torch.load(weights_only=True)`.

  These build arrays of plain dtypes from bytes; any other global stays refused. The
  "numpy.core" aliases let files pickled under numpy 1 load under numpy 2.
  """
  try:
    from numpy._core import multiarray  # pylint: disable=import-outside-toplevel
  except ImportError:  # numpy 1
    from numpy.core import multiarray  # pylint: disable=import-outside-toplevel
  reconstruct = multiarray._reconstruct  # pylint: disable=protected-access
  out = [reconstruct, multiarray.scalar, np.ndarray, np.dtype,
         (reconstruct, "numpy.core.multiarray._reconstruct"),
         (multiarray.scalar, "numpy.core.multiarray.scalar")]
  out += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2",
                                      "u4", "u8", "?")]
  return out


def read_torch_checkpoint(path: str) -> Any:
  """`torch.load(path, weights_only=True)`, numpy arrays allowed (see the module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"weight file not found: {path}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs a CPU torch (pip install torch), or convert it "
                      "once elsewhere with `python -m retrieval_jax.models.pretrained`") from e
  with torch.serialization.safe_globals(_numpy_safe_globals()):
    try:
      return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      # torch's own message may advise weights_only=False, i.e. running the file's code:
      # it is never passed on.
      text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      if "weights_only" in str(e) or "Weights only" in str(e):
        text = ("it holds Python objects other than tensors, numbers and strings, which are "
                "refused (loading them could run code from the file)")
      raise errors.NotAWeightFileError(_not_a_weight_file(path, text)) from None


_WEIGHT_FORMATS = ("model.pretrained takes a torchvision / timm state dict (.pth, .bin, "
                   ".safetensors), a cnnimageretrieval-pytorch checkpoint, or an .npz "
                   "converted by `python -m retrieval_jax.models.pretrained BACKBONE SRC "
                   "DST.npz`")


def _not_a_weight_file(path: str, reason: str) -> str:
  return f"{path} is not a weight file ({reason}). {_WEIGHT_FORMATS}"


def _to_numpy_tree(obj: Any) -> Any:
  """Tensors -> numpy, recursively through dicts / lists (meta dicts keep their values)."""
  if hasattr(obj, "detach"):
    return obj.detach().cpu().numpy()
  if isinstance(obj, Mapping):
    return {k: _to_numpy_tree(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_numpy_tree(v) for v in obj)
  return obj


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """A `.safetensors` file (Hugging Face hub / timm) as numpy arrays, without the package.

  Format: 8-byte little-endian header size, a JSON header {name: {dtype, shape,
  data_offsets}}, then the raw little-endian tensor bytes. BF16 becomes float32.
  """
  try:
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      if header_len > os.path.getsize(path) - 8:
        raise ValueError(f"header length {header_len} past the end of the file")
      header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
      raise ValueError("the header is not a JSON object")
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise errors.NotAWeightFileError(
        _not_a_weight_file(path, f"not a .safetensors file: {e}")) from None
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    raw = np.asarray(data[start:end])
    if info["dtype"] == "BF16":  # the high half of a float32
      value = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif info["dtype"] in _SAFETENSORS_DTYPES:
      value = raw.view(_SAFETENSORS_DTYPES[info["dtype"]])
    else:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    out[name] = value.reshape(info["shape"]).copy()
  return out


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> Dict[str, Any]:
  """Drops nn.DataParallel's `module.` prefix when every key has it."""
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _state_dict_of(obj: Any) -> Dict[str, np.ndarray]:
  """The tensors of a loaded checkpoint as numpy arrays, by key.

  Unwraps a 'state_dict' or 'model' entry and drops a DataParallel `module.` prefix.
  """
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model"):
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
  sd = {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
  return _strip_prefix(sd)


def read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A state dict as numpy arrays: `.pth` / `.bin` (torch), or `.safetensors`.

  A checkpoint holding the weights under 'state_dict' (cirtorch, timm training) or 'model'
  is unwrapped, and a DataParallel `module.` prefix dropped.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"weight file not found: {path}")
  if path.endswith(".safetensors"):
    return _strip_prefix(read_safetensors(path))
  return _state_dict_of(read_torch_checkpoint(path))


def save_npz(variables: Mapping[str, Any], path: str) -> None:
  flat = traverse_util.flatten_dict(variables, sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def load_npz(path: str) -> Dict[str, Any]:
  """An .npz of `save_npz` -> the nested variables; anything else is NotAWeightFileError."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"weight file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as f:
      flat = {k: f[k] for k in f.files}
  except (ValueError, OSError, EOFError, AttributeError, TypeError,
          zipfile.BadZipFile) as e:
    raise errors.NotAWeightFileError(
        _not_a_weight_file(path, f"not an .npz archive of arrays: {e}")) from None
  foreign = sorted(k for k in flat if not k.startswith(("params/", "batch_stats/")))
  if not flat or foreign:
    raise errors.NotAWeightFileError(
        f"{path} is an .npz file but not one converted by retrieval_jax: its arrays are "
        f"named {(foreign or ['(none)'])[:3]}, ours 'params/...' and 'batch_stats/...'. "
        "Convert the original weights once with `python -m retrieval_jax.models.pretrained "
        "BACKBONE SRC DST.npz`")
  return traverse_util.unflatten_dict(flat, sep="/")


def load_backbone_variables(backbone: str, path: str) -> Dict[str, Any]:
  """Trunk variables {"params", "batch_stats"} from a weight file (see the module docstring).

  Accepts our converted `.npz`, torchvision / timm state dicts (`.pth`, `.bin`,
  `.safetensors`) and cirtorch checkpoints (their trunk only; `load_cirtorch` gives the
  rest).
  """
  if path.endswith(".npz"):
    return load_npz(path)
  return get_backbone(backbone).convert(_prepare_trunk_dict(backbone,
                                                            read_torch_state_dict(path)))


def _check_plain_resnet(state_dict: Mapping[str, Any]) -> None:
  """Refuses timm's deep-stem / average-pool-shortcut ResNets, whose names differ."""
  if any(k.startswith("conv1.0.") for k in state_dict) or any(
      ".downsample.2." in k for k in state_dict):
    raise ValueError("this is a timm ResNet variant with a deep stem or an average-pool "
                     "shortcut (resnet50d / c / s / e ...), which our ResNet does not have; use "
                     "plain ResNet weights (torchvision, or timm 'resnet50.a1_in1k' / "
                     "'resnet50.tv_in1k').")


# ----------------------------------------------------------------------------------------------
# cnnimageretrieval-pytorch checkpoints.

# cirtorch's `features` of a ResNet is `list(net.children())[:-2]`: conv1, bn1, relu, maxpool,
# layer1, ..., layer4 (ReLU and max-pool hold no weights).
_CIRTORCH_RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2",
                             "6": "layer3", "7": "layer4"}
_CIRTORCH_ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                           "vgg16")
_CIRTORCH_POOLINGS = ("mac", "spoc", "gem", "rmac")


def cirtorch_resnet_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """cirtorch ResNet `features.N.*` keys -> torchvision names (other keys dropped)."""
  out = {}
  for k, v in state_dict.items():
    if not k.startswith("features."):
      continue
    child, _, rest = k[len("features."):].partition(".")
    if child not in _CIRTORCH_RESNET_CHILDREN:
      raise ValueError(f"unexpected cirtorch ResNet tensor {k}: features.{child} should have "
                       "no weights")
    out[f"{_CIRTORCH_RESNET_CHILDREN[child]}.{rest}"] = v
  return out


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
  sd = {k: np.asarray(v) for k, v in _strip_prefix(state_dict).items()}
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
    trunk = get_backbone(arch).convert(cirtorch_resnet_state_dict(features))
  else:
    trunk = get_backbone(arch).convert(features)  # VGG: torchvision's features.N already
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
  mean = tuple(float(v) for v in meta.get("mean", IMAGENET_MEAN))
  std = tuple(float(v) for v in meta.get("std", IMAGENET_STD))
  return ImportedNetwork(variables=variables, backbone=arch, pooling=pooling,
                         whitening_dim=whitening_dim, mean=mean, std=std,
                         pooling_kwargs=pooling_kwargs, meta=dict(meta), whitening=lw)


def _is_cirtorch(obj: Any) -> bool:
  return (isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping)
          and "architecture" in obj["meta"] and "state_dict" in obj)


def load_cirtorch(path: str, obj: Any = None) -> ImportedNetwork:
  """Reads a cnnimageretrieval-pytorch checkpoint (e.g. retrievalSfM120k-resnet101-gem-*.pth).

  `torch.load(weights_only=True)`; the optimiser state and other entries are ignored.

  Args:
    path: the `.pth` file.
    obj: the already loaded checkpoint, if the caller has it.
  """
  obj = read_torch_checkpoint(path) if obj is None else obj
  if not _is_cirtorch(obj):
    raise ValueError(f"{path} is not a cnnimageretrieval-pytorch checkpoint "
                     "(expected keys 'state_dict' and 'meta' with an 'architecture')")
  net = convert_cirtorch(_to_numpy_tree(obj["state_dict"]), _to_numpy_tree(obj["meta"]))
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


def load_pretrained_into(variables: Mapping[str, Any], model, path: str
                         ) -> Tuple[Dict[str, Any], Optional[ImportedNetwork]]:
  """`variables` of RetrievalNet `model` with everything the weight file `path` provides.

  A cirtorch checkpoint fills the trunk, GeM p and the whitening layer (after checking that
  the model's backbone / pooling / whitening_dim match, and warning when its mean/std
  differ from the model's); any other file fills the trunk only.

  Returns:
    (variables, the ImportedNetwork for a cirtorch file else None).
  """
  obj = None
  if not path.endswith((".npz", ".safetensors")):
    obj = read_torch_checkpoint(path)
  if obj is None or not _is_cirtorch(obj):
    trunk = (load_backbone_variables(model.backbone, path) if obj is None else
             get_backbone(model.backbone).convert(_prepare_trunk_dict(model.backbone,
                                                                      _state_dict_of(obj))))
    return merge_backbone(variables, trunk), None
  net = load_cirtorch(path, obj)
  check_model_matches(net, model.backbone, model.pooling, model.whitening_dim)
  if (np.abs(np.subtract(net.mean, model.mean)).max() > 1e-6
      or np.abs(np.subtract(net.std, model.std)).max() > 1e-6):
    logging.warning("%s expects mean %s std %s; the model normalises with %s %s: build it "
                    "with model.clone(mean=net.mean, std=net.std)", path, net.mean, net.std,
                    model.mean, model.std)
  out = merge_backbone(variables, {k: v["backbone"] for k, v in net.variables.items()})
  params = dict(out["params"])
  for name in ("pool", "whiten"):
    if name in net.variables["params"]:
      params[name] = _checked_replace(params.get(name), net.variables["params"][name], name)
  out["params"] = params
  return out, net


def _prepare_trunk_dict(backbone: str, sd: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Key renames before a trunk converter: cirtorch ResNet `features.N`; timm checks."""
  if backbone.startswith("resnet"):
    if any(k.startswith("features.") for k in sd):
      return cirtorch_resnet_state_dict(sd)
    _check_plain_resnet(sd)
  return sd


def _checked_replace(current: Optional[Mapping[str, Any]], new: Mapping[str, Any],
                     name: str) -> Dict[str, Any]:
  if current is None:
    raise ValueError(f"the model has no {name!r} params to load into")
  out = {}
  for k, v in new.items():
    if k not in current or tuple(np.shape(current[k])) != tuple(np.shape(v)):
      raise ValueError(f"pretrained {name}/{k} of shape {np.shape(v)} does not fit the model "
                       f"({None if k not in current else np.shape(current[k])})")
    out[k] = np.asarray(v, getattr(current[k], "dtype", np.float32))
  return out


def merge_backbone(variables: Mapping[str, Any], trunk: Mapping[str, Any],
                   scope: str = "backbone") -> Dict[str, Any]:
  """Replaces `variables[col][scope]` by the pretrained trunk, checking shapes leaf by leaf."""
  out = {col: dict(tree) for col, tree in variables.items()}
  for col, tree in trunk.items():
    if col not in out or scope not in out[col]:
      raise ValueError(f"model has no {col}/{scope} to load pretrained weights into")
    want = traverse_util.flatten_dict(out[col][scope], sep="/")
    got = traverse_util.flatten_dict(tree, sep="/")
    if set(want) != set(got):
      raise ValueError(f"pretrained {col} do not match the model: missing "
                       f"{sorted(set(want) - set(got))[:5]}, unexpected "
                       f"{sorted(set(got) - set(want))[:5]}")
    for k, v in got.items():
      if tuple(np.shape(v)) != tuple(want[k].shape):
        raise ValueError(f"pretrained {col}/{scope}/{k}: shape {np.shape(v)} != model "
                         f"{want[k].shape}")
    out[col][scope] = traverse_util.unflatten_dict(
        {k: np.asarray(v, want[k].dtype) for k, v in got.items()}, sep="/")
  return out


def main(argv=None):
  """`python -m retrieval_jax.models.pretrained BACKBONE SRC.pth DST.npz`: convert once."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("backbone", choices=backbone_names())
  parser.add_argument("src")
  parser.add_argument("dst")
  args = parser.parse_args(argv)
  save_npz(load_backbone_variables(args.backbone, args.src), args.dst)
  print(f"wrote {args.dst}")


if __name__ == "__main__":
  main()
