"""The three modes behind main.py: train, extract, evaluate.

extract / evaluate restore the latest checkpoint's params (or, with no checkpoint, the
`model.pretrained` weights off the shelf), learn the requested post-hoc whitening once
(`learned_whitening`), and then stream descriptors to disk / score the test set.
"""
import os
from typing import Any, Dict

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import checkpointing
from retrieval_jax import evaluate as evaluate_lib
from retrieval_jax import extract as extract_lib
from retrieval_jax import learned_whitening
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import train as train_lib
from retrieval_jax import train_state as train_state_lib
from retrieval_jax.data import datasets
from retrieval_jax.models import pretrained
from retrieval_jax.models import retrieval_net


def restore_model(config, workdir: str, mesh):
  """The model and its trained variables (params + BatchNorm statistics, no optimiser).

  Restores `config.extract.checkpoint_step` (-1: the latest) of `<workdir>/checkpoints`.
  Without any checkpoint, a config naming `model.pretrained` gives the off-the-shelf
  network (logged loudly; step None): the trunk, plus GeM p and the whitening layer of a
  cnnimageretrieval-pytorch checkpoint, whose precomputed whitening `meta['Lw']` is then
  stored as `<workdir>/whitening/lw.npz` for `eval.whitening="learned"`.

  Returns:
    (model, variables, step).
  """
  model, _ = retrieval_net.from_config(config.model)
  if (config.model.get("pretrained", "") and config.extract.checkpoint_step < 0
      and not _has_checkpoint(workdir)):
    return _pretrained_model(config, workdir, model, mesh)
  shapes_only = _no_pretrained(config.model)
  abstract = jax.eval_shape(lambda: train_state_lib.init_variables(
      model, config.data.image_size, jax.random.key(0), shapes_only))
  rep = sharding_lib.replicated(mesh)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)
  variables, step = checkpointing.restore_variables(workdir, abstract,
                                                    config.extract.checkpoint_step)
  logging.info("restored params of step %d", step)
  return model, variables, step


def _has_checkpoint(workdir: str) -> bool:
  """A complete checkpoint exists (orbax renames `<step>.orbax-checkpoint-tmp*` when done)."""
  folder = checkpointing.checkpoint_dir(workdir)
  return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))


def _init_missing(variables, model, config):
  """Values for the leaves the weight file did not provide (still ShapeDtypeStructs).

  GeM exponents take `pooling_kwargs.p_init`; anything else (e.g. a whitening layer that a
  trunk-only file lacks) comes from a full `model.init`, which compiles the whole network.
  """
  p_init = float(dict(model.pooling_kwargs or {}).get("p_init", 3.0))
  missing = []

  def fill(path, leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    if path[-1].key == "p":
      return np.full(leaf.shape, p_init, leaf.dtype)
    missing.append(jax.tree_util.keystr(path))
    return leaf

  variables = jax.tree_util.tree_map_with_path(fill, variables)
  if missing:
    logging.warning("not in the weight file, randomly initialised: %s", missing[:8])
    init = train_state_lib.init_variables(model, config.data.image_size,
                                          jax.random.key(config.seed),
                                          _no_pretrained(config.model))
    variables = jax.tree_util.tree_map(
        lambda v, i: i if isinstance(v, jax.ShapeDtypeStruct) else v, variables, init)
  return variables


def _pretrained_model(config, workdir: str, model, mesh):
  """(model, variables, None) from `config.model.pretrained` alone (no training)."""
  path = train_state_lib.resolve_weights_path(config.model.pretrained)
  logging.warning("no checkpoint in %s: evaluating the pretrained weights %s as they are "
                  "(off-the-shelf)", checkpointing.checkpoint_dir(workdir), path)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, config.data.image_size, config.data.image_size, 3), jnp.uint8))
  variables, imported = pretrained.load_pretrained_into(dict(shapes), model, path)
  variables = _init_missing(variables, model, config)
  if imported is not None:
    model = model.clone(mean=imported.mean, std=imported.std)
    if imported.whitening and learned_whitening.requested(config) == "learned":
      learned_whitening.save_imported(config, workdir, imported)
  return model, jax.device_put(variables, sharding_lib.replicated(mesh)), None


def _no_pretrained(model_config):
  """model config without pretrained weights: shapes only, nothing read from disk."""
  c = model_config.copy_and_resolve_references()
  with c.unlocked():
    c.pretrained = ""
  return c


def _test_set(config, workdir):
  return datasets.get_dataset(config.eval.dataset,
                              config.eval.root or train_lib.data_root(config, workdir),
                              config.eval.split)


def run(mode: str, config, workdir: str) -> Dict[str, Any]:
  if mode == "train":
    results = train_lib.train_and_evaluate(config, workdir)
    return _summary(workdir, results)
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
  model, variables, step = restore_model(config, workdir, mesh)
  test_set = _test_set(config, workdir)
  # Learned after training from training pairs (or PCA), once per checkpoint; see
  # learned_whitening.py. None unless config.eval.whitening asks for it.
  describe = extract_lib.make_describe_fn(model, mesh)  # compiled once for every set
  white = learned_whitening.get_or_compute(config, workdir, model, variables, mesh, step,
                                           describe_fn=describe)
  name = "pretrained" if step is None else f"step{step}"
  if mode == "evaluate":
    result = evaluate_lib.evaluate(model, variables, test_set, mesh=mesh,
                                   extract_config=config.extract, workdir=workdir,
                                   tag=f"evaluate_{name}", pictures=config.eval.pictures,
                                   whitening=white, describe_fn=describe,
                                   rerank=evaluate_lib.rerank_config(config.eval))
    return _summary(workdir, {"after": result}, step)
  if mode == "extract":
    return _extract(config, workdir, model, variables, mesh, test_set, white, describe)
  raise ValueError(f"unknown mode {mode!r}")


def _extract(config, workdir, model, variables, mesh, test_set, white, describe
             ) -> Dict[str, Any]:
  """Streams query and database descriptors to `<workdir>/descriptors/<set>_<part>/`.

  Each folder holds descriptors.npy [N, D] (float32, L2-normalised, row i = images.txt line
  i), images.txt and config.json; with a whitening, `<set>_<part>_<kind>/` holds the
  whitened ones too.
  """
  kw = extract_lib.extract_kwargs(config.extract, variables)
  out = {}
  for part, paths, bbx in (("query", test_set.query_images, test_set.query_bbx),
                           ("db", test_set.db_images, None)):
    if not len(paths):
      continue
    folder = os.path.join(workdir, "descriptors", f"{test_set.name}_{part}")
    rot = (None if not test_set.rotations else
           [int(test_set.rotations.get(p, 0)) for p in paths])
    # Every process runs the sharded extraction; only process 0 writes the shared folder.
    main_process = sharding_lib.is_main_process()
    d = extract_lib.extract_descriptors(model, variables, paths, bboxes=bbx, rotations=rot,
                                        mesh=mesh, out_folder=folder if main_process else None,
                                        describe_fn=describe,
                                        config_json=config.to_json_best_effort(), **kw)
    out[part] = {"path": folder, "shape": list(d.shape)}
    sharding_lib.sync(f"extract_{part}")
    if white is not None and main_process:
      wfolder = f"{folder}_{white['kind']}"
      w = extract_lib.apply_to_folder(
          folder, wfolder, lambda x: learned_whitening.apply(x, white, white["dim"]))
      out[f"{part}_{white['kind']}"] = {"path": wfolder, "shape": list(w.shape)}
  return out


def _summary(workdir: str, results: Dict[str, Any], step=None) -> Dict[str, Any]:
  """Before/after numbers side by side; the 'before' comes from the training run's file."""
  out = {}
  for k, r in evaluate_lib.with_saved_before(workdir, results).items():
    if r:
      out[k] = {m: float(v) for m, v in r.items() if isinstance(v, (int, float, np.floating))}
      for line in r.get("lines", []):
        print(f"[{k}] {line}")
  if step is not None:
    out["checkpoint_step"] = int(step)
  return out
