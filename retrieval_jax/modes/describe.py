"""--mode=describe: every image of a folder / list file (`config.describe`) to descriptors,
streamed and resumable (`describe.py`), with the descriptor settings of a user's folder
(recorded in the index's config.json, so search describes its queries the same way)."""
import json

from retrieval_jax import describe as describe_lib
from retrieval_jax.modes import common


def describe(config, workdir: str) -> common.Summary:
  """`describe.images` -> `describe.out` ("" = <workdir>/describe)."""
  if not config.describe.images:
    raise ValueError("--mode=describe needs --config.describe.images=<folder or list file>")
  net, mesh = common.network(config, workdir)
  out = common.output_dir(config.describe.out, workdir, "describe")
  settings = common.settings_for_folders(config, net)
  record = json.dumps({"describe": dict(settings.record(), images=config.describe.images),
                       "config": json.loads(config.to_json_best_effort())})
  got = describe_lib.describe_images(net.model, net.variables, config.describe.images, out,
                                     mesh=mesh, chunk=int(config.describe.chunk),
                                     config_json=record, **settings.extract_kwargs())
  return {"index": out, "images": len(got["images"]), "skipped": len(got["skipped"]),
          "dim": int(got["dim"])}
