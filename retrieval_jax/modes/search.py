"""--mode=search: top-k of a query image / folder in a described folder (`config.search`),
JSON + pictures, exact on the mesh or faiss (`index_search.py`); the queries are described
with the settings the index was described with."""
import os

from absl import logging

from retrieval_jax import descriptor_store
from retrieval_jax import index_search
from retrieval_jax.data import protocol as protocol_lib
from retrieval_jax.modes import common


def search(config, workdir: str) -> common.Summary:
  """Top `search.k` of `search.query` in `search.index`; JSON + pictures in `search.out`."""
  sc = config.search
  if not sc.query:
    raise ValueError("--mode=search needs --config.search.query=<image, folder or list file>")
  index = os.path.abspath(common.or_default(sc.index, os.path.join(workdir, "describe")))
  stored = descriptor_store.load_descriptors(index)
  net, mesh = common.network(config, workdir)
  settings = common.extract_settings(config, net)
  recorded = stored["config"].get("describe") if isinstance(stored["config"], dict) else None
  if recorded:  # describe the queries as the index was described
    settings.update(long_side=int(recorded["long_side"]),
                    scales=tuple(recorded["scales"]), multiscale_p=recorded["multiscale_p"],
                    protocol=protocol_lib.EvalProtocol(**recorded["protocol"]))
  out = os.path.abspath(common.or_default(sc.out, os.path.join(workdir, "search")))
  got = index_search.search_folder(
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
