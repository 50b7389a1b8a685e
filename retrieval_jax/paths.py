"""Where things live in a workdir (and the data root that defaults into it).

  <workdir>/data/          datasets, unless `config.data.root` names a folder
  <workdir>/checkpoints/   orbax checkpoints (checkpointing.py)
  <workdir>/results/       evaluation JSON and pictures (evaluation/pipeline.py)
  <workdir>/descriptors/   extracted descriptors (run.py's extract mode)
  <workdir>/whitening/     post-hoc whitening (postprocess/whitening_store.py)
  <workdir>/tuples/        epoch-mined tuples (train/inputs.py)
"""
import hashlib
import os
import tempfile
from typing import Optional

from absl import logging

from retrieval_jax import sharding
from retrieval_jax import storage
from retrieval_jax.data import image_io


def data_root(config, workdir: str) -> str:
  """`config.data.root`, or `<workdir>/data` when it is empty.

  `data.root` may be a local folder, a mounted bucket (gcsfuse: the fast path) or a bucket
  URL (gs://...), read through epath (each image read whole as bytes, decoded from memory).
  With a bucket workdir the default data folder is a local cache named after it.
  """
  root = config.data.root
  if root:
    return root
  if storage.is_remote(workdir):
    tag = hashlib.sha1(workdir.encode()).hexdigest()[:12]
    local = os.path.join(tempfile.gettempdir(), "retrieval_jax_data", tag)
    logging.info("workdir %s is a bucket: datasets go to the local cache %s "
                 "(set data.root to choose the folder)", workdir, local)
    return local
  return os.path.join(workdir, "data")


def results_dir(workdir: str) -> str:
  return storage.join(workdir, "results")


def write_skipped_list(workdir: str, name: str, entries) -> Optional[str]:
  """results/<name>_skipped.txt: every image a mode left out, (path, reason) per line.

  Every mode writes one where files were skipped, so a number is never reported without the
  list of the files it silently lacks. Only the main process writes.

  Returns:
    The file's path, or None when nothing was skipped (no file then) or on other processes.
  """
  text = image_io.skipped_list_text(entries)
  if not text or not sharding.is_main_process():
    return None
  path = storage.join(results_dir(workdir), f"{name}_skipped.txt")
  storage.write_text(path, text)
  return path


def eval_root(config, workdir: str) -> str:
  """The test set's data root: `config.eval.root`, or `data_root` when it is empty."""
  return config.eval.root or data_root(config, workdir)
