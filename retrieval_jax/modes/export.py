"""--mode=export: the network (latest checkpoint, else `model.pretrained` off the shelf,
said in the log) as `jax.export` + TF SavedModel + export.json in `export.dir`
(`export.py`), describing as the descriptor settings say (`export.long_side`, `scales`,
`multiscale_combine` replace `extract.*`'s where set). A DELG network (`model.local_head`)
also gets the reference's DELG signature (`export_delg.py`: `extract.local_*`, with
`export.local_max_scale`), its "serving_default" unless `export.serving_default=describe`."""
import json
import shutil
import tempfile

from retrieval_jax import export as export_lib
from retrieval_jax import export_delg
from retrieval_jax import restore
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import storage
from retrieval_jax.modes import common
from retrieval_jax.postprocess import whitening_store


def bakes_whitening(config) -> bool:
  """`export.whitening`: "auto" (the default) follows `eval.whitening`, so the exported
  descriptor is the evaluated one; True / False (or "true" / "false") force it."""
  value = config.export.whitening
  if isinstance(value, str):
    words = {"auto": None, "true": True, "false": False}
    if value.lower() not in words:
      raise ValueError(f"export.whitening must be 'auto', True or False, got {value!r}")
    value = words[value.lower()]
  if value is None:
    return bool(whitening_store.requested(config))
  return bool(value)


def export(config, workdir: str) -> common.Summary:
  """`D = export.dir` ("" = <workdir>/export): D/jax/, D/saved_model/, D/export.json."""
  net, mesh = common.network(config, workdir)
  ec = config.export
  white = None
  if bakes_whitening(config):
    if not whitening_store.requested(config):
      raise ValueError("export.whitening=True bakes in the post-hoc whitening of "
                       "eval.whitening: set --config.eval.whitening=learned (or pca)")
    white = whitening_store.get_or_compute(config, workdir, net.model, net.variables, mesh,
                                           net.step)
  settings = common.settings_for_folders(config, net, overrides=ec)
  options = export_lib.options_from_settings(settings, normalize=bool(ec.normalize),
                                             whitening=white)
  delg = None
  if settings.local is not None:
    local = settings.local
    delg = export_delg.DelgOptions(
        long_side=int(local.long_side),
        max_scale=float(ec.local_max_scale or max(local.scales)),
        iou_threshold=float(local.iou_threshold))
  out = common.output_dir(ec.dir, workdir, "export")
  info = {"source": net.source, "checkpoint_step": net.step,
          "pretrained": config.model.pretrained if net.source == restore.PRETRAINED else "",
          "config": json.loads(config.to_json_best_effort())}
  if sharding_lib.is_main_process():
    # jax.export / TF write local files: a bucket gets a local copy uploaded, export.json last.
    local = tempfile.mkdtemp(prefix="retrieval_jax_export_") if storage.is_remote(out) else out
    meta = export_lib.export_model(net.model, net.variables, local, options,
                                   platforms=tuple(ec.platforms) or None,
                                   saved_model=bool(ec.saved_model), info=info,
                                   delg=delg, serving_default=str(ec.serving_default))
    if local != out:
      storage.upload_folder(local, out, last=export_lib.EXPORT_JSON)
      shutil.rmtree(local, ignore_errors=True)
  sharding_lib.sync("export", timeout_s=sharding_lib.WRITE_TIMEOUT_S)
  return {"export_dir": out, "descriptor_dim": meta["descriptor_dim"] if
          sharding_lib.is_main_process() else None, "source": net.source}
