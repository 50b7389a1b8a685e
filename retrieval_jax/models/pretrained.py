"""Weight import: a user's weight file into the variables of a `RetrievalNet`.

Weights are converted once from PyTorch layouts to our param trees; `main` saves them as
`.npz`, which later loads without torch. One job per module:

* `backbones.py`: the trunk registry (name -> module, torch converter, input mean/std);
* `weight_files.py`: reading `.pth` / `.bin` (torch, `weights_only=True`), `.safetensors`
  (numpy reader, no pickle) and our `.npz`, refusing anything that is not a weight file;
* `torch_keys.py`: per-backbone key mapping (timm ResNets, cirtorch `features.N`);
* `cirtorch.py`: cnnimageretrieval-pytorch checkpoints (trunk, GeM p, whitening layer, meta,
  precomputed `Lw`); `cvnet.py`: CVNet's global networks (trunk, GeM p, reduction layer);
* this module: which of those a file is, and merging it into a model's variables, checking
  every shape.

Supported files: torchvision / timm state dicts (`resnet*`, `vgg16`, `mobilenet_v2`,
`efficientnet_lite0`), cirtorch checkpoints, our `.npz`. Keras `.h5` files are not read
(h5py is not a dependency): convert them to a torchvision state dict or `.npz` elsewhere.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

from absl import logging
import numpy as np
from flax import traverse_util

from retrieval_jax.models import backbones
from retrieval_jax.models import cirtorch
from retrieval_jax.models import cvnet
from retrieval_jax.models import torch_keys
from retrieval_jax.models import weight_files

def load_backbone_variables(backbone: str, path: str) -> Dict[str, Any]:
  """Trunk variables {"params", "batch_stats"} from a weight file (see the module docstring).

  Accepts our converted `.npz`, torchvision / timm state dicts (`.pth`, `.bin`,
  `.safetensors`) and cirtorch checkpoints (their trunk only; `cirtorch.load_cirtorch` gives the
  rest).
  """
  if path.endswith(".npz"):
    return weight_files.load_npz(path)
  return backbones.get_backbone(backbone).convert(torch_keys.prepare_trunk_dict(
      backbone, weight_files.read_torch_state_dict(path)))


def load_pretrained_into(variables: Mapping[str, Any], model, path: str
                         ) -> Tuple[Dict[str, Any], Optional[cirtorch.ImportedNetwork]]:
  """`variables` of RetrievalNet `model` with everything the weight file `path` provides.

  A cirtorch or CVNet checkpoint fills the trunk, GeM p and the whitening layer (after checking that
  the model's backbone / pooling / whitening_dim match, and warning when its mean/std
  differ from the model's); any other file fills the trunk only.

  Returns:
    (variables, the ImportedNetwork for a cirtorch or CVNet file else None).
  """
  obj = None
  if not path.endswith((".npz", ".safetensors")):
    obj = weight_files.read_torch_checkpoint(path)
  is_network = obj is not None and (cirtorch.is_cirtorch(obj) or cvnet.is_cvnet(obj))
  if not is_network:
    trunk = (load_backbone_variables(model.backbone, path) if obj is None else
             backbones.get_backbone(model.backbone).convert(torch_keys.prepare_trunk_dict(
                 model.backbone, weight_files.state_dict_of(obj))))
    return merge_backbone(variables, trunk), None
  net = (cvnet.load_cvnet(path, obj) if cvnet.is_cvnet(obj)
         else cirtorch.load_cirtorch(path, obj))
  cirtorch.check_model_matches(net, model.backbone, model.pooling, model.whitening_dim)
  if (np.abs(np.subtract(net.mean, model.mean)).max() > 1e-6
      or np.abs(np.subtract(net.std, model.std)).max() > 1e-6):
    logging.warning("%s expects mean %s std %s; the model normalises with %s %s: build it "
                    "with model.clone(mean=net.mean, std=net.std)", path, net.mean, net.std,
                    model.mean, model.std)
  out = merge_backbone(variables, {k: v["backbone"] for k, v in net.variables.items()})
  params = dict(out["params"])
  for name in ("pool", "whiten"):
    if name == "pool" and "pool" not in params and not dict(
        model.pooling_kwargs or {}).get("trainable", True):
      logging.info("%s: GeM p %s of the file not used, the model's p is fixed at %s "
                   "(model.pooling_kwargs.trainable=False)", path,
                   net.pooling_kwargs.get("p_init"), dict(model.pooling_kwargs).get("p_init"))
      continue
    if name in net.variables["params"]:
      params[name] = _checked_replace(params.get(name), net.variables["params"][name], name)
  out["params"] = params
  return out, net


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
  parser.add_argument("backbone", choices=backbones.backbone_names())
  parser.add_argument("src")
  parser.add_argument("dst")
  args = parser.parse_args(argv)
  weight_files.save_npz(load_backbone_variables(args.backbone, args.src), args.dst)
  print(f"wrote {args.dst}")


if __name__ == "__main__":
  main()
