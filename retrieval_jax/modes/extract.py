"""--mode=extract: the test set's descriptors (and local features) to the workdir."""
import os

from retrieval_jax import descriptor_store
from retrieval_jax import extract as extract_lib
from retrieval_jax import networks
from retrieval_jax import paths
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.data import image_io
from retrieval_jax.data import integrity
from retrieval_jax.local import benchmark as local_benchmark
from retrieval_jax.modes import common
from retrieval_jax.modes import evaluate as evaluate_mode
from retrieval_jax.postprocess import whitening as whitening_lib


def extract(config, workdir: str) -> common.Summary:
  """Streams query and database descriptors to `<workdir>/descriptors/<set>_<part>/`.

  Each folder holds descriptors.npy [N, D] (float32, L2-normalised, row i = images.txt line
  i), images.txt and config.json; with a whitening, `<set>_<part>_<kind>/` holds the
  whitened ones too.
  """
  net, mesh, test_set, describe, white = evaluate_mode.prepare(config, workdir)
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
    stores = local_benchmark.extract_local_features(config, workdir, net.model, net.variables,
                                                   mesh, test_set, common.tag(net))
    for part, store in zip(("query", "db"), stores):
      out[f"{part}_local"] = {"path": str(store.folder), "images": len(store),
                              "dim": store.dim}
  return out


