"""The three modes behind main.py: train, extract, evaluate."""
import json
import os
from typing import Any, Dict

from absl import logging
import jax
import numpy as np

from retrieval_jax import checkpointing
from retrieval_jax import evaluate as evaluate_lib
from retrieval_jax import extract as extract_lib
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import train as train_lib
from retrieval_jax import train_state as train_state_lib
from retrieval_jax.data import datasets
from retrieval_jax.models import retrieval_net


def restore_model(config, workdir: str, mesh):
  """The model and its trained variables (params + BatchNorm statistics, no optimiser)."""
  model, _ = retrieval_net.from_config(config.model)
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
  if mode == "evaluate":
    result = evaluate_lib.evaluate(model, variables, test_set, mesh=mesh,
                                   extract_config=config.extract, workdir=workdir,
                                   tag=f"evaluate_step{step}", pictures=config.eval.pictures)
    return _summary(workdir, {"after": result}, step)
  if mode == "extract":
    kw = dict(mesh=mesh, long_side=config.extract.long_side,
              batch_size=config.extract.batch_size, scales=tuple(config.extract.scales),
              multiscale_p=extract_lib.multiscale_p_from(variables, "gem"))
    out = {}
    for part, paths, bbx in (("query", test_set.query_images, test_set.query_bbx),
                             ("db", test_set.db_images, None)):
      d = extract_lib.extract_descriptors(model, variables, paths, bboxes=bbx, **kw)
      folder = os.path.join(workdir, "descriptors", f"{test_set.name}_{part}")
      extract_lib.save_descriptors(folder, d, list(paths), config.to_json_best_effort())
      out[part] = {"path": folder, "shape": list(d.shape)}
    return out
  raise ValueError(f"unknown mode {mode!r}")


def _summary(workdir: str, results: Dict[str, Any], step=None) -> Dict[str, Any]:
  """Before/after numbers side by side; the 'before' comes from the training run's file."""
  out = {}
  before = os.path.join(workdir, "results", "before.json")
  if "before" not in results and os.path.exists(before):
    with open(before) as f:
      results = dict(results, before=json.load(f))
  for k, r in results.items():
    if r:
      out[k] = {m: float(v) for m, v in r.items() if isinstance(v, (int, float, np.floating))}
      for line in r.get("lines", []):
        print(f"[{k}] {line}")
  if step is not None:
    out["checkpoint_step"] = int(step)
  return out
