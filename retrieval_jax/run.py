"""What `main.py --mode=<mode>` runs: `run(mode, config, workdir)`, dispatched through `MODES`.

A mode is one function `fn(config, workdir) -> dict` (the JSON summary main.py prints),
registered under its name; adding a mode is adding one entry:

  @MODES.register("describe")
  def _describe(config, workdir): ...

  train     train (resuming if a checkpoint exists), evaluating before and after;
  evaluate  restore the latest checkpoint (or the off-the-shelf `model.pretrained`), learn the
            requested post-hoc whitening once, score the test set;
  extract   the same network, descriptors of the test set's queries and database to
            `<workdir>/descriptors/<set>_<part>/` (and their whitened versions); with a
            local head (DELG), local features to `<workdir>/local/<tag>/<set>_<part>/`;
  export    the network as a jax.export function + TF SavedModel (`serving.py`);
  describe  every image of a folder / list file to descriptors, resumable (`serving.py`);
  search    top-k of query images in a described folder, JSON + pictures (`serving.py`);
  serve     a search page and JSON API over a described folder (`search_page/`).
"""
import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from retrieval_jax import config_checks
from retrieval_jax import descriptor_store
from retrieval_jax import evaluate as evaluate_lib
from retrieval_jax import evaluate_local
from retrieval_jax import extract as extract_lib
from retrieval_jax import networks
from retrieval_jax import paths
from retrieval_jax import registry
from retrieval_jax import restore
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import serving
from retrieval_jax.search_page import app as search_page_app
from retrieval_jax.data import datasets
from retrieval_jax.data import image_io
from retrieval_jax.data import integrity
from retrieval_jax.postprocess import whitening as whitening_lib
from retrieval_jax.postprocess import whitening_store
from retrieval_jax.train import loop as train_loop

Summary = Dict[str, Any]
# The result label of a network evaluated without a checkpoint of this workdir.
OFF_THE_SHELF = "off-the-shelf (pretrained weights, no checkpoint)"
MODES: registry.Registry[Callable[[Any, str], Summary]] = registry.Registry("mode")


def run(mode: str, config, workdir: str) -> Summary:
  """Runs `mode` (a name in `MODES`) on `config` in `workdir`; returns its summary.

  The config's values are checked first (`config_checks.validate`), before any compute.
  """
  if mode not in MODES:
    raise config_checks.ConfigError(f"--mode={mode!r} is not one of {MODES.names()}")
  config_checks.validate(config, mode)
  return MODES.get(mode)(config, workdir)


@MODES.register("train")
def _train(config, workdir: str) -> Summary:
  return summary(workdir, train_loop.train_and_evaluate(config, workdir))


def prepare(config, workdir: str) -> Tuple[restore.Restored, Any, Any, Callable[..., Any],
                                            Optional[Dict[str, Any]]]:
  """(restored network, mesh, test set, describe fn, whitening or None) for `config`.

  The whitening is learned after training from training pairs (or PCA), once per
  checkpoint (`postprocess/whitening_store.py`); None unless `config.eval.whitening` asks.
  """
  root = config.eval.root or paths.data_root(config, workdir)
  test_set = datasets.get_dataset(config.eval.dataset, root, config.eval.split, config=config)
  # Every image of the benchmark must be there before any compute (data/integrity.py); a
  # cheap existence check here, the full one (headers, counts) where the set is described.
  integrity.check_retrieval_set(test_set, root=root, check="exists",
                                allow_missing=config.eval.allow_missing)
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
  net = restore.restore_model(config, workdir, mesh)
  describe = extract_lib.make_describe_fn(net.model, mesh)  # compiled once for every set
  white = whitening_store.get_or_compute(config, workdir, net.model, net.variables, mesh,
                                         net.step, describe_fn=describe)
  return net, mesh, test_set, describe, white


def tag(net: restore.Restored) -> str:
  """"pretrained" for off-the-shelf weights, else "step<N>"."""
  return "pretrained" if net.source == restore.PRETRAINED else f"step{net.step}"


@MODES.register("evaluate")
def _evaluate(config, workdir: str) -> Summary:
  net, mesh, test_set, describe, white = prepare(config, workdir)
  result = evaluate_lib.evaluate(net.model, net.variables, test_set, mesh=mesh,
                                 extract_config=config.extract, workdir=workdir,
                                 tag=f"evaluate_{tag(net)}", pictures=config.eval.pictures,
                                 whitening=white, describe_fn=describe,
                                 rerank=evaluate_lib.rerank_config(config.eval),
                                 allow_missing=config.eval.allow_missing,
                                 data_root=config.eval.root or paths.data_root(config, workdir),
                                 approximate=evaluate_lib.approximate_config(config))
  if config.eval.rerank:
    # Local features (model.local_head): the re-ranked numbers beside the global ones.
    extra = evaluate_local.evaluate_rerank(config, workdir, net.model, net.variables, mesh,
                                           test_set, tag=f"evaluate_{tag(net)}",
                                           whitening=white, describe_fn=describe)
    suffix = f"_{config.eval.rerank}"
    result = dict(result, **{k: v for k, v in extra.items() if k.endswith(suffix)})
    result["lines"] = list(result["lines"]) + extra["rerank_lines"]
  label = OFF_THE_SHELF if net.source == restore.PRETRAINED else "after"
  return summary(workdir, {label: result}, net.step)


@MODES.register("extract")
def _extract(config, workdir: str) -> Summary:
  """Streams query and database descriptors to `<workdir>/descriptors/<set>_<part>/`.

  Each folder holds descriptors.npy [N, D] (float32, L2-normalised, row i = images.txt line
  i), images.txt and config.json; with a whitening, `<set>_<part>_<kind>/` holds the
  whitened ones too.
  """
  net, mesh, test_set, describe, white = prepare(config, workdir)
  checked = integrity.check_retrieval_set(
      test_set, root=config.eval.root or paths.data_root(config, workdir),
      allow_missing=config.eval.allow_missing)
  test_set = checked.dataset
  kw = extract_lib.extract_kwargs(config.extract, net.variables, net.model, test_set.name)
  skipped = image_io.SkipCounter()  # Unreadable images get zero rows, listed in results/.
  out = {}
  for part, images, bbx in (("query", test_set.query_images, test_set.query_bbx),
                            ("db", test_set.db_images, None)):
    if not len(images):
      continue
    folder = os.path.join(workdir, "descriptors", f"{test_set.name}_{part}")
    rot = (None if not test_set.rotations else
           [int(test_set.rotations.get(p, 0)) for p in images])
    # Every process runs the sharded extraction; only process 0 writes the shared folder.
    main_process = sharding_lib.is_main_process()
    d = extract_lib.extract_descriptors(net.model, net.variables, images, bboxes=bbx,
                                        rotations=rot, mesh=mesh,
                                        out_folder=folder if main_process else None,
                                        describe_fn=describe, skipped=skipped,
                                        config_json=config.to_json_best_effort(), **kw)
    out[part] = {"path": folder, "shape": list(d.shape)}
    sharding_lib.sync(f"extract_{part}")
    if white is not None and main_process:
      wfolder = f"{folder}_{white['kind']}"
      w = descriptor_store.apply_to_folder(
          folder, wfolder, lambda x: whitening_lib.apply(x, white, white["dim"]))
      out[f"{part}_{white['kind']}"] = {"path": wfolder, "shape": list(w.shape)}
  path = paths.write_skipped_list(workdir, test_set.name, checked.entries + skipped.entries)
  if path:
    out["skipped"] = {"path": path, **checked.summary(), "unreadable": skipped.total}
  if networks.has_local_head(net.model):
    # DELG: local features beside the descriptors, in <workdir>/local/<tag>/<set>_<part>/.
    stores = evaluate_local.extract_local_features(config, workdir, net.model, net.variables,
                                                   mesh, test_set, tag(net))
    for part, store in zip(("query", "db"), stores):
      out[f"{part}_local"] = {"path": str(store.folder), "images": len(store),
                              "dim": store.dim}
  return out


# The user-facing modes (retrieval_jax/serving.py): export the network for serving,
# describe a folder of photos, search it.
MODES.register("export", serving.export_mode)
MODES.register("describe", serving.describe_mode)
MODES.register("search", serving.search_mode)
MODES.register("serve", search_page_app.serve_mode)  # the search page (search_page/)


def summary(workdir: str, results: Dict[str, Any], step: Optional[int] = None) -> Summary:
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
