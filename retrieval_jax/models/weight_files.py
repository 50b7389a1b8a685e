"""Reading weight files without running their code: torch `.pth` / `.bin`, `.safetensors`,
and our converted `.npz`.

Security: `.pth` files are read with `torch.load(weights_only=True)`, which refuses arbitrary
pickled objects; cirtorch's `meta['Lw']` holds numpy arrays, so `read_torch_checkpoint`
allows exactly numpy's array/scalar reconstruction (data, no code) on top of that.
`.safetensors` files are read by a small numpy reader (no pickle at all).
"""
import json
import os
import struct
import zipfile
from typing import Any, Dict, Mapping

import numpy as np
from flax import traverse_util

from retrieval_jax import errors

WEIGHT_FORMATS = ("model.pretrained takes a torchvision / timm state dict (.pth, .bin, "
                  ".safetensors), a cnnimageretrieval-pytorch checkpoint, or an .npz "
                  "converted by `python -m retrieval_jax.models.pretrained BACKBONE SRC "
                  "DST.npz`")


def not_a_weight_file(path: str, reason: str) -> str:
  """The message of a NotAWeightFileError for `path`, listing the accepted formats."""
  return f"{path} is not a weight file ({reason}). {WEIGHT_FORMATS}"


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
      raise errors.NotAWeightFileError(not_a_weight_file(path, text)) from None


def to_numpy_tree(obj: Any) -> Any:
  """Tensors -> numpy, recursively through dicts / lists (meta dicts keep their values)."""
  if hasattr(obj, "detach"):
    return obj.detach().cpu().numpy()
  if isinstance(obj, Mapping):
    return {k: to_numpy_tree(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(to_numpy_tree(v) for v in obj)
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
        not_a_weight_file(path, f"not a .safetensors file: {e}")) from None
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


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> Dict[str, Any]:
  """Drops nn.DataParallel's `module.` prefix when every key has it."""
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def state_dict_of(obj: Any) -> Dict[str, np.ndarray]:
  """The tensors of a loaded checkpoint as numpy arrays, by key.

  Unwraps a 'state_dict' or 'model' entry and drops a DataParallel `module.` prefix.
  """
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model"):
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
  sd = {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
  return strip_prefix(sd)


def read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A state dict as numpy arrays: `.pth` / `.bin` (torch), or `.safetensors`.

  A checkpoint holding the weights under 'state_dict' (cirtorch, timm training) or 'model'
  is unwrapped, and a DataParallel `module.` prefix dropped.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"weight file not found: {path}")
  if path.endswith(".safetensors"):
    return strip_prefix(read_safetensors(path))
  return state_dict_of(read_torch_checkpoint(path))


def save_npz(variables: Mapping[str, Any], path: str) -> None:
  """Variables {"params", "batch_stats"} as one `.npz`, arrays named 'params/a/b/...'."""
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
        not_a_weight_file(path, f"not an .npz archive of arrays: {e}")) from None
  foreign = sorted(k for k in flat if not k.startswith(("params/", "batch_stats/")))
  if not flat or foreign:
    raise errors.NotAWeightFileError(
        f"{path} is an .npz file but not one converted by retrieval_jax: its arrays are "
        f"named {(foreign or ['(none)'])[:3]}, ours 'params/...' and 'batch_stats/...'. "
        "Convert the original weights once with `python -m retrieval_jax.models.pretrained "
        "BACKBONE SRC DST.npz`")
  return traverse_util.unflatten_dict(flat, sep="/")
