"""--mode=extract: the test set's descriptors (and local features) to the workdir."""
import os

from retrieval_jax import descriptor_settings
from retrieval_jax import descriptor_store
from retrieval_jax import extract as extract_lib
from retrieval_jax import paths
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.data import image_io
from retrieval_jax.evaluation import test_set as test_set_lib
from retrieval_jax.evaluation import local_rerankers
from retrieval_jax.modes import common
from retrieval_jax.postprocess import whitening as whitening_lib
from retrieval_jax.postprocess import whitening_store


def extract(config, workdir: str) -> common.Summary:
  """Streams query and database descriptors to `<workdir>/descriptors/<set>_<part>/`.

  Each folder holds descriptors.npy [N, D] (float32, L2-normalised, row i = images.txt line
  i), images.txt and config.json; with a whitening, `<set>_<part>_<kind>/` holds the
  whitened ones too.
  """
  test = test_set_lib.load(config, workdir, extra=False)  # checked before any compute
  if test is None:
    raise ValueError("--mode=extract describes the test set of eval.dataset: set "
                     "--config.eval.dataset=<name>")
  net, mesh = common.network(config, workdir)
  describe = extract_lib.make_describe_fn(net.model, mesh)  # compiled once for every set
  white = whitening_store.get_or_compute(config, workdir, net.model, net.variables, mesh,
                                         net.step, describe_fn=describe)
  test_set = test.dataset
  settings = descriptor_settings.build(config, net.model, net.variables, test_set.name)
  skipped = image_io.SkipCounter()  # Unreadable images get zero rows, listed in results/.
  out = {}
  for part, images, bbx in (("query", test_set.query_images, test_set.query_bbx),
                            ("db", test_set.db_images, None)):
    if not len(images):
      continue
    folder = os.path.join(workdir, "descriptors", f"{test.prefix}_{part}")
    # Every process runs the sharded extraction; only process 0 writes the shared folder.
    main_process = sharding_lib.is_main_process()
    d = extract_lib.extract_descriptors(
        net.model, net.variables, images, bboxes=bbx,
        rotations=settings.image_rotations(test_set.rotations, images), mesh=mesh,
        out_folder=folder if main_process else None, describe_fn=describe, skipped=skipped,
        config_json=config.to_json_best_effort(), **settings.extract_kwargs())
    out[part] = {"path": folder, "shape": list(d.shape)}
    sharding_lib.sync(f"extract_{part}")
    if white is not None and main_process:
      wfolder = f"{folder}_{white['kind']}"
      w = descriptor_store.apply_to_folder(
          folder, wfolder, lambda x: whitening_lib.apply(x, white, white["dim"]))
      out[f"{part}_{white['kind']}"] = {"path": wfolder, "shape": list(w.shape)}
  checked = test.completeness
  path = paths.write_skipped_list(workdir, test_set.name, checked.entries + skipped.entries)
  if path:
    out["skipped"] = {"path": path, **checked.summary(), "unreadable": skipped.total}
  if settings.local is not None:
    # DELG: local features beside the descriptors, in <workdir>/local/<tag>/<set>_<part>/.
    stores = local_rerankers.extract_local_features(
        net.model, net.variables, mesh, settings, test_set, workdir=workdir,
        tag=common.tag(net), prefix=test.prefix)
    for part, store in zip(("query", "db"), stores):
      out[f"{part}_local"] = {"path": str(store.folder), "images": len(store),
                              "dim": store.dim}
  return out
