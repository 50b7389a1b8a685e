"""The user-facing modes: export, describe, search (registered in run.py's `MODES`).

  --mode=export    `config.export`: the network (latest checkpoint, else `model.pretrained`
                   off the shelf, said in the log) as `jax.export` + TF SavedModel +
                   export.json in `export.dir` (`export.py`);
  --mode=describe  `config.describe`: every image of a folder / list file to descriptors
                   (streamed, resumable; `describe.py`);
  --mode=search    `config.search`: top-k of a query image / folder in a described folder,
                   JSON + pictures, exact on the mesh or faiss (`folder_search.py`).

Each returns the JSON summary main.py prints. The extraction settings are `config.extract`'s
(long_side, scales, multiscale_combine); search reads the ones the index was described with.
"""
import dataclasses
import json
import os
from typing import Any, Dict

from absl import logging

from retrieval_jax import describe as describe_lib
from retrieval_jax import descriptor_store
from retrieval_jax import export as export_lib
from retrieval_jax import extract as extract_lib
from retrieval_jax import folder_search
from retrieval_jax import restore
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.data import protocol as protocol_lib
from retrieval_jax.postprocess import whitening_store

Summary = Dict[str, Any]


def network(config, workdir: str):
  """(restored network, mesh): the latest checkpoint, else `model.pretrained` (said)."""
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
  net = restore.restore_model(config, workdir, mesh)
  if net.source == restore.PRETRAINED:
    logging.warning("no checkpoint in %s: using the pretrained weights %s as they are",
                    workdir, config.model.pretrained)
  return net, mesh


def _or(value, default):
  """`value`, or `default` where the config leaves it unset ("", 0, ())."""
  return default if value in ("", None, ()) or (isinstance(value, int) and value == 0) \
      else value


def export_mode(config, workdir: str) -> Summary:
  """`D = export.dir` ("" = <workdir>/export): D/jax/, D/saved_model/, D/export.json."""
  net, mesh = network(config, workdir)
  ec = config.export
  white = None
  if ec.whitening:
    if not whitening_store.requested(config):
      raise ValueError("export.whitening=True bakes in the post-hoc whitening of "
                       "eval.whitening: set --config.eval.whitening=learned (or pca)")
    white = whitening_store.get_or_compute(config, workdir, net.model, net.variables, mesh,
                                           net.step)
  combine = _or(ec.multiscale_combine, config.extract.multiscale_combine)
  options = export_lib.options_from_protocol(
      protocol_lib.from_config(config.extract, ""),  # a user's images: the "auto" rule
      long_side=int(_or(ec.long_side, config.extract.long_side)),
      scales=tuple(float(s) for s in _or(tuple(ec.scales), tuple(config.extract.scales))),
      multiscale_combine=combine, normalize=bool(ec.normalize), whitening=white)
  out = os.path.abspath(_or(ec.dir, os.path.join(workdir, "export")))
  info = {"source": net.source, "checkpoint_step": net.step,
          "pretrained": config.model.pretrained if net.source == restore.PRETRAINED else "",
          "config": json.loads(config.to_json_best_effort())}
  if sharding_lib.is_main_process():
    meta = export_lib.export_model(net.model, net.variables, out, options,
                                   platforms=tuple(ec.platforms) or None,
                                   saved_model=bool(ec.saved_model), info=info)
  sharding_lib.sync("export")
  return {"export_dir": out, "descriptor_dim": meta["descriptor_dim"] if
          sharding_lib.is_main_process() else None, "source": net.source}


def _extract_settings(config, net) -> Dict[str, Any]:
  """`config.extract` as extraction arguments, for a user's folder (dataset name "": EXIF
  orientation applied, `extract.exif_transpose="auto"`)."""
  kw = extract_lib.extract_kwargs(config.extract, net.variables, net.model, "")
  return {k: kw[k] for k in ("long_side", "batch_size", "scales", "multiscale_p", "protocol")}


def _recordable(settings: Dict[str, Any]) -> Dict[str, Any]:
  return dict(settings, scales=list(settings["scales"]),
              protocol=dataclasses.asdict(settings["protocol"]))


def describe_mode(config, workdir: str) -> Summary:
  """`describe.images` -> `describe.out` ("" = <workdir>/describe)."""
  if not config.describe.images:
    raise ValueError("--mode=describe needs --config.describe.images=<folder or list file>")
  net, mesh = network(config, workdir)
  out = os.path.abspath(_or(config.describe.out, os.path.join(workdir, "describe")))
  settings = _extract_settings(config, net)
  record = json.dumps({"describe": dict(_recordable(settings), images=config.describe.images),
                       "config": json.loads(config.to_json_best_effort())})
  got = describe_lib.describe_images(net.model, net.variables, config.describe.images, out,
                                     mesh=mesh, chunk=int(config.describe.chunk),
                                     config_json=record, **settings)
  return {"index": out, "images": len(got["images"]), "skipped": len(got["skipped"]),
          "dim": int(got["descriptors"].shape[1])}


def query_settings(config, net, stored: Dict[str, Any]) -> Dict[str, Any]:
  """The extraction arguments that describe queries as the index `stored` was described.

  `stored` is `descriptor_store.load_descriptors(index)`; the settings recorded by
  --mode=describe in its config.json win over `config.extract`. --mode=search and
  --mode=serve (`search_page/`) both describe their queries with these.
  """
  settings = _extract_settings(config, net)
  recorded = stored["config"].get("describe") if isinstance(stored["config"], dict) else None
  if recorded:
    settings.update(long_side=int(recorded["long_side"]),
                    scales=tuple(recorded["scales"]), multiscale_p=recorded["multiscale_p"],
                    protocol=protocol_lib.EvalProtocol(**recorded["protocol"]))
  return settings


def search_mode(config, workdir: str) -> Summary:
  """Top `search.k` of `search.query` in `search.index`; JSON + pictures in `search.out`."""
  sc = config.search
  if not sc.query:
    raise ValueError("--mode=search needs --config.search.query=<image, folder or list file>")
  index = os.path.abspath(_or(sc.index, os.path.join(workdir, "describe")))
  stored = descriptor_store.load_descriptors(index)
  net, mesh = network(config, workdir)
  settings = query_settings(config, net, stored)
  out = os.path.abspath(_or(sc.out, os.path.join(workdir, "search")))
  got = folder_search.search_folder(
      net.model, net.variables, index, sc.query, out, mesh=mesh, k=int(sc.k),
      backend=sc.backend, factory=sc.faiss_factory, nprobe=int(sc.nprobe),
      pictures_max=int(sc.pictures), stored=stored, **settings)
  for entry in got["results"][:5]:
    best = entry["results"][:3]
    logging.info("%s -> %s", entry["query"],
                 ", ".join(f"#{r['rank']} {os.path.basename(r['image'])} {r['score']:.3f}"
                           for r in best))
  return {"results": got["json"], "pictures": got["pictures"][:3],
          "queries": len(got["results"])}
