"""Post-hoc whitening of a trained network's descriptors, stored beside its checkpoints.

After training (or for a pretrained network), descriptors of training images are whitened
as in cnnimageretrieval-pytorch's test.py (`--whitening retrieval-SfM-120k`):

* "learned" (Radenović et al.'s "Lw", `whitening.learn_whitening`): from matching pairs
  (`mining.pairs.training_pairs(pairing="cycle")`): the dataset's own (`qidxs` / `pidxs`,
  e.g. SfM-120k's whitening pairs) or, for a labelled training set without them (the demo,
  GLDv2), pairs of images with the same label;
* "pca" (`whitening.learn_pca_whitening`): from the same images, without labels;
* "pfa" (`whitening.select_features_pfa`, Seddati et al.): keep `whitening_dim` features
  chosen by Principal Feature Analysis of the same images, L2-normalised.

`compute_and_save` writes `<workdir>/whitening/lw.npz` (learned), `pca.npz` or `pfa.npz` with
`m` [D], `P` [D', D] and what they were computed from (the weights' identity: checkpoint
step and a digest of the variables; the learning set; the digest of the
`DescriptorSettings` its images were described with); `get_or_compute` reuses the file
only while all of them match, so a whitening of other weights or another protocol is never
reused.
The maths (`learn`, and `apply`: `P[:dim] (x - m)`, L2) is in `whitening.py`.

Config fields (defaults in configs/common.py):
  config.eval.whitening          "" (none) | "learned" | "pca" | "pfa"
  config.eval.whitening_dim      components kept, 0 = all ("pfa": features kept, > 0)
  config.eval.whitening_dataset  dataset to learn on, "" = config.data.name
  config.eval.whitening_split    its split, "" = "whiten" for SfM-120k/30k, else "train"
  config.eval.whitening_max_pairs  subsample the pairs (seeded), 0 = all
  config.eval.whitening_pca_dim  "learned": first reduce to this many principal components,
                                 0 = no reduction (see `learn`)

On the demo set (730 same-label pairs, MobileNetV2-GeM 1280-D, 20 training steps) the
held-out mAP is 88.1 raw, 87.0 learned (automatic 657-D span), 91.9 learned after a
128-D PCA, 85.5 PCA-whitened to 256-D: with few pairs, reduce first.
"""
import hashlib
import json
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
import numpy as np

from retrieval_jax import descriptor_settings
from retrieval_jax import extract
from retrieval_jax import paths
from retrieval_jax import sharding
from retrieval_jax import storage
from retrieval_jax.data import datasets
from retrieval_jax.mining import pairs as pairs_lib
from retrieval_jax.postprocess import whitening

FILES = {"learned": "lw.npz", "pca": "pca.npz", "pfa": "pfa.npz"}


def whitening_path(workdir: str, kind: str) -> str:
  """`<workdir>/whitening/lw.npz` (learned), `pca.npz` or `pfa.npz`."""
  if kind not in whitening.KINDS:
    raise ValueError(f"whitening kind must be one of {whitening.KINDS}, got {kind!r}")
  return storage.join(storage.resolve(workdir), "whitening", FILES[kind])


def requested(config) -> str:
  """The whitening kind asked for by `config.eval.whitening` ("" for none)."""
  kind = str(config.eval.whitening or "")
  if kind and kind not in whitening.KINDS:
    raise ValueError(f"eval.whitening must be '' or one of {whitening.KINDS}, got {kind!r}")
  return kind


def save(path: str, m: np.ndarray, proj: np.ndarray, info: Dict[str, Any]) -> None:
  """m, P and the JSON `info` in one .npz (atomically replaced; local folder or bucket)."""
  storage.save_npz(path, m=np.asarray(m, np.float64), P=np.asarray(proj, np.float64),
                   info=np.asarray(json.dumps(info)))


def load(path: str) -> Dict[str, Any]:
  """{"m": [D], "P": [r, D], "info": dict} from `save`."""
  f = storage.load_npz(path)
  return {"m": f["m"], "P": f["P"], "info": json.loads(str(f["info"]))}


def weights_digest(variables) -> str:
  """A short SHA-256 of every variable's bytes: the weights' identity."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(variables),
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def _key(config, kind: str, model, variables, step: Optional[int]
         ) -> Tuple[Dict[str, Any], descriptor_settings.DescriptorSettings]:
  """(what a stored whitening depends on, the settings its images are described with).

  A file is reused only if every value matches: the learning set and parameters, the
  descriptor settings' digest and the weights' identity (checkpoint step and digest).
  """
  ev = config.eval
  name = ev.whitening_dataset or config.data.name  # "": the training set
  split = ev.whitening_split or ("whiten" if name.startswith("retrieval-sfm") else "train")
  settings = descriptor_settings.build(config, model, variables, name)
  return {"kind": kind, "checkpoint_step": None if step is None else int(step),
          "weights": weights_digest(variables), "settings": settings.digest(),
          "backbone": model.backbone, "pooling": model.pooling,
          "dataset": name, "split": split,
          "max_pairs": int(ev.whitening_max_pairs or 0),
          "pca_dim": int(ev.whitening_pca_dim or 0),
          **({"num_features": int(ev.whitening_dim)} if kind == "pfa" else {})}, settings


def compute_and_save(config, workdir: str, model, variables, mesh, step: Optional[int],
                     kind: Optional[str] = None, describe_fn=None) -> str:
  """Learns the whitening of a restored network and writes it; returns the path.

  Args:
    config: the experiment config (fields in the module docstring; the data root is
      `paths.data_root`, as training uses).
    workdir: the workdir it is stored in.
    model, variables, step: the network (as `restore.restore_model` returns it).
    mesh: the device mesh.
    kind: "learned" or "pca"; default `config.eval.whitening` ("learned" when empty).
    describe_fn: a compiled `extract.make_describe_fn(model, mesh)` to reuse.
  """
  kind = kind or requested(config) or "learned"
  key, settings = _key(config, kind, model, variables, step)
  train_set = datasets.get_dataset(key["dataset"], paths.data_root(config, workdir),
                                   key["split"], config=config)
  q, p = pairs_lib.training_pairs(train_set.labels, train_set.qidxs, train_set.pidxs,
                                  pairing="cycle", max_pairs=key["max_pairs"],
                                  seed=int(config.seed))
  used = np.unique(np.concatenate([q, p]))  # extract only the images of the pairs
  pos = np.full(len(train_set.images), -1, np.int64)
  pos[used] = np.arange(len(used))
  logging.info("%s whitening of %s/%s: %d pairs over %d images", kind, key["dataset"],
               key["split"], len(q), len(used))
  x = extract.extract_descriptors(model, variables, [train_set.images[i] for i in used],
                                  mesh=mesh, describe_fn=describe_fn,
                                  **settings.extract_kwargs())
  readable = np.linalg.norm(x, axis=1) > 0
  ok = readable[pos[q]] & readable[pos[p]]
  if not ok.all():
    logging.warning("whitening: %d pairs dropped (unreadable images)", int((~ok).sum()))
  if kind == "learned":
    m, proj = whitening.learn(x, kind, pos[q][ok], pos[p][ok], pca_dim=key["pca_dim"])
  else:
    m, proj = whitening.learn(x[readable], kind, num_features=key.get("num_features", 0))
  path = whitening_path(workdir, kind)
  if sharding.is_main_process():  # every process learned the same; process 0 writes it
    save(path, m, proj, dict(key, num_pairs=int(ok.sum()), num_images=int(len(used)),
                             dim_in=int(proj.shape[1]), rank=int(proj.shape[0])))
    logging.info("wrote %s (P %s)", path, proj.shape)
  sharding.sync("whitening_saved", timeout_s=sharding.WRITE_TIMEOUT_S)
  return path


def get_or_compute(config, workdir: str, model, variables, mesh, step: Optional[int],
                   describe_fn=None) -> Optional[Dict[str, Any]]:
  """The requested whitening {"m", "P", "info", "kind", "dim"}, learned now if missing/stale.

  None when `config.eval.whitening` is empty.
  """
  kind = requested(config)
  if not kind:
    return None
  path = whitening_path(workdir, kind)
  want, _ = _key(config, kind, model, variables, step)
  stored = load(path) if storage.exists(path) else None
  # Learning extracts on every process: process 0's view of the file decides for all.
  stale = stored is None or any(stored["info"].get(k) != v for k, v in want.items())
  if sharding.agree(stale):
    if stored is not None:
      logging.info("%s is stale (computed for other settings or another checkpoint); "
                   "learning it again", path)
    compute_and_save(config, workdir, model, variables, mesh, step, kind, describe_fn)
    stored = load(path)
  return dict(stored, kind=kind, dim=int(config.eval.whitening_dim or 0))


def save_imported(config, workdir: str, imported, model, variables) -> Optional[str]:
  """Stores a released network's precomputed learned whitening (cirtorch `meta['Lw']`).

  Picks the entry of `config.eval.whitening_dataset` (case-insensitive, e.g.
  'retrieval-SfM-120k'; the first one when unset or absent) and its multi-scale ('ms') or
  single-scale ('ss') version by the descriptor settings' scales, and writes it as `lw.npz`
  for the pretrained network (checkpoint step None, these variables), so `get_or_compute`
  uses it instead of learning one. Returns the path, or None when the file has no whitening.
  """
  if not imported.whitening:
    return None
  want = (config.eval.whitening_dataset or "").lower()
  names = sorted(imported.whitening)
  name = next((n for n in names if n.lower() == want), names[0])
  key, settings = _key(config, "learned", model, variables, None)
  kind = "ms" if len(settings.scales) > 1 else "ss"
  entry = imported.whitening[name]
  kind = kind if kind in entry else sorted(entry)[0]
  m, proj = entry[kind]
  path = whitening_path(workdir, "learned")
  if sharding.is_main_process():
    save(path, m, proj, dict(key, source=f"meta Lw {name}/{kind}",
                             rank=int(proj.shape[0]), dim_in=int(proj.shape[1])))
  sharding.sync("whitening_imported", timeout_s=sharding.WRITE_TIMEOUT_S)
  logging.info("using the checkpoint's precomputed whitening %s/%s -> %s", name, kind, path)
  return path

