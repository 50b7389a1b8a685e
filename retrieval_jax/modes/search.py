"""--mode=search: top-k of a query image / folder in a described folder (`config.search`),
JSON + pictures, exact on the mesh or faiss (`index_search.py`); the queries are described
with the settings the index was described with (its config.json), early fusion included."""
import os

from absl import logging

from retrieval_jax import descriptor_settings
from retrieval_jax import descriptor_store
from retrieval_jax import index_search
from retrieval_jax.modes import common


def query_settings(config, net, stored) -> descriptor_settings.DescriptorSettings:
  """How queries are described for the index `stored` (`descriptor_store.load_descriptors`):
  as the index was (its config.json), else as a user's folder now. --mode=search and
  --mode=serve (`search_page/`) both use it."""
  recorded = stored["config"].get("describe") if isinstance(stored["config"], dict) else None
  return (descriptor_settings.from_record(recorded) if recorded
          else common.settings_for_folders(config, net))


def search(config, workdir: str) -> common.Summary:
  """Top `search.k` of `search.query` in `search.index`; JSON + pictures in `search.out`."""
  sc = config.search
  if not sc.query:
    raise ValueError("--mode=search needs --config.search.query=<image, folder or list file>")
  index = common.output_dir(sc.index, workdir, "describe")
  stored = descriptor_store.load_descriptors(index)
  net, mesh = common.network(config, workdir)
  settings = query_settings(config, net, stored)
  out = common.output_dir(sc.out, workdir, "search")
  got = index_search.search_folder(
      net.model, net.variables, index, sc.query, out, mesh=mesh, k=int(sc.k),
      backend=sc.backend, factory=sc.faiss_factory, nprobe=int(sc.nprobe),
      pictures_max=int(sc.pictures), stored=stored, **settings.extract_kwargs())
  for entry in got["results"][:5]:
    best = entry["results"][:3]
    logging.info("%s -> %s", entry["query"],
                 ", ".join(f"#{r['rank']} {os.path.basename(r['image'])} {r['score']:.3f}"
                           for r in best))
  return {"results": got["json"], "pictures": got["pictures"][:3],
          "queries": len(got["results"])}
