"""Post-hoc whitening of a trained network's descriptors, stored beside its checkpoints.

After training (or for a pretrained network), descriptors of training images are whitened
as in cnnimageretrieval-pytorch's test.py (`--whitening retrieval-SfM-120k`):

* "learned" (Radenović et al.'s "Lw", `whitening.learn_whitening`): from matching pairs,
  the dataset's own (`qidxs` / `pidxs`, e.g. SfM-120k's whitening pairs) or, for a labelled
  training set without them (the demo, GLDv2), pairs of images with the same label;
* "pca" (`whitening.learn_pca_whitening`): from the same images, without labels.

`compute_and_save` writes `<workdir>/whitening/lw.npz` (learned) or `pca.npz` with `m` [D],
`P` [D', D] and what they were computed from (checkpoint step, dataset, extraction
settings); `get_or_compute` reuses the file while it matches the checkpoint and settings, and
`apply` projects descriptors (`P[:dim] (x - m)`, L2), keeping the leading `dim` components.

Small training sets: when the pair differences (learned) or the images (PCA) span fewer
than D dimensions, the covariance is singular and its inverse square root would blow up
directions that carry no data. The whitening is then learned in the subspace they span
(numerical rank r < D), so P is [r, D]; with SfM-120k's ~90k pairs this never triggers.

Config fields (read with defaults, so older configs work):
  config.eval.whitening          "" (none) | "learned" | "pca"
  config.eval.whitening_dim      components kept, 0 = all
  config.eval.whitening_dataset  dataset to learn on, "" = config.data.name
  config.eval.whitening_split    its split, "" = "whiten" for SfM-120k/30k, else "train"
  config.eval.whitening_max_pairs  subsample the pairs (seeded), 0 = all
  config.eval.whitening_pca_dim  "learned": first reduce to this many principal components,
                                 0 = no reduction (see `learn`)

On the demo set (730 same-label pairs, MobileNetV2-GeM 1280-D, 20 training steps) the
held-out mAP is 88.1 raw, 87.0 learned (automatic 657-D span), 91.9 learned after a
128-D PCA, 85.5 PCA-whitened to 256-D: with few pairs, reduce first.
"""
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from retrieval_jax import extract
from retrieval_jax import whitening
from retrieval_jax.data import datasets

KINDS = ("learned", "pca")
FILES = {"learned": "lw.npz", "pca": "pca.npz"}
# Eigenvalues below this fraction of the largest count as zero (float32 descriptors).
_RANK_TOL = 1e-9


def whitening_path(workdir: str, kind: str) -> str:
  """`<workdir>/whitening/lw.npz` (learned) or `pca.npz`."""
  if kind not in KINDS:
    raise ValueError(f"whitening kind must be one of {KINDS}, got {kind!r}")
  return os.path.join(os.path.abspath(workdir), "whitening", FILES[kind])


def requested(config) -> str:
  """The whitening kind asked for by `config.eval.whitening` ("" for none)."""
  kind = str(config.eval.get("whitening", "") or "")
  if kind and kind not in KINDS:
    raise ValueError(f"eval.whitening must be '', 'learned' or 'pca', got {kind!r}")
  return kind


# ----------------------------------------------------------------------------------------------
# Pairs and learning (numpy, host).


def training_pairs(train_set: datasets.TrainSet, max_pairs: int = 0, seed: int = 0
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """(qidxs, pidxs) [P] of matching images of `train_set`.

  The dataset's own pairs when it has them; otherwise, within every label >= 0 with at
  least two images, a cycle through its images (each image is the query of one pair and the
  positive of another), so the query mean is the mean of all labelled images.

  Args:
    train_set: a TrainSet.
    max_pairs: keep a seeded random subset of this many pairs (0: all).
    seed: subsampling seed.
  """
  if train_set.qidxs is not None and len(train_set.qidxs):
    q, p = np.asarray(train_set.qidxs, np.int64), np.asarray(train_set.pidxs, np.int64)
  else:
    labels = np.asarray(train_set.labels)
    q_list, p_list = [], []
    for c in np.unique(labels[labels >= 0]):
      members = np.flatnonzero(labels == c)
      if len(members) < 2:
        continue
      if len(members) == 2:
        q_list.append(members[:1])
        p_list.append(members[1:])
      else:
        q_list.append(members)
        p_list.append(np.roll(members, -1))
    if not q_list:
      raise ValueError(f"{train_set.name}: no pairs (no qidxs/pidxs, no label with 2 images)")
    q, p = np.concatenate(q_list), np.concatenate(p_list)
  if max_pairs and len(q) > max_pairs:
    keep = np.sort(np.random.default_rng(seed).choice(len(q), max_pairs, replace=False))
    q, p = q[keep], p[keep]
  return q, p


def _subspace(cov: np.ndarray) -> np.ndarray:
  """[D, r] orthonormal basis of the range of a PSD matrix (eigenvalues > tol * max)."""
  eigval, eigvec = np.linalg.eigh((cov + cov.T) / 2)
  order = eigval.argsort()[::-1]
  eigval, eigvec = eigval[order], eigvec[:, order]
  r = int(np.sum(eigval > _RANK_TOL * max(eigval[0], 1e-300)))
  return eigvec[:, :max(r, 1)]


def learn(x: np.ndarray, kind: str, qidxs: Optional[Sequence[int]] = None,
          pidxs: Optional[Sequence[int]] = None, pca_dim: int = 0
          ) -> Tuple[np.ndarray, np.ndarray]:
  """m [D] and P [r, D] (r <= D, see the module docstring) from descriptors x [N, D].

  Args:
    x: [N, D] descriptors, one per row.
    kind: "learned" (needs qidxs / pidxs, row indices of matching pairs) or "pca".
    pca_dim: "learned" only: learn it on the `pca_dim` leading principal components of x
      (a regulariser for small training sets; 0: on everything the pairs span).
  Returns:
    (m, P) float64, to apply as `P[:dim] (x - m)`; rows of P by decreasing importance.
  """
  x = np.asarray(x, np.float64)
  if kind == "learned":
    q, p = np.asarray(qidxs), np.asarray(pidxs)
    if pca_dim and pca_dim < x.shape[1]:
      xc = x - x.mean(axis=0)
      eigval, eigvec = np.linalg.eigh(xc.T @ xc)
      basis = eigvec[:, np.argsort(eigval)[::-1][:pca_dim]]
      logging.info("learned whitening on the %d leading principal components", pca_dim)
    else:
      df = x[q] - x[p]
      basis = _subspace(df.T @ df / len(df))  # [D, r]
      if basis.shape[1] == x.shape[1]:
        return whitening.learn_whitening(x, q, p)
      logging.info("learned whitening: the %d pairs span %d of %d dimensions; learning it "
                   "there", len(q), basis.shape[1], x.shape[1])
    # Learned on the projected rows y = x B (m_y = B^T m, the projected query mean):
    # P_y (y - m_y) = P_y B^T (x - m), so P = P_y B^T with m the query mean itself.
    _, p_y = whitening.learn_whitening(x @ basis, q, p)
    return x[q].mean(axis=0), p_y @ basis.T
  if kind == "pca":
    xc = x - x.mean(axis=0)
    basis = _subspace(xc.T @ xc / len(x))
    r = basis.shape[1]
    if r < x.shape[1]:
      logging.info("PCA whitening: %d images span %d of %d dimensions; keeping those", len(x),
                   r, x.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
      m, proj = whitening.learn_pca_whitening(x)
    return m, proj[:r]
  raise ValueError(f"whitening kind must be one of {KINDS}, got {kind!r}")


def apply(x: np.ndarray, w: Dict[str, Any], dim: int = 0) -> np.ndarray:
  """Whitened descriptors [N, min(dim, r)] float32, rows L2-normalised."""
  m, proj = np.asarray(w["m"]), np.asarray(w["P"])
  if dim and dim > proj.shape[0]:
    logging.warning("whitening_dim %d > the %d learned components; keeping %d", dim,
                    proj.shape[0], proj.shape[0])
  return whitening.apply_whitening(x, m, proj, dim or None).astype(np.float32)


def save(path: str, m: np.ndarray, proj: np.ndarray, info: Dict[str, Any]) -> None:
  """m, P and the JSON `info` in one .npz (atomically replaced)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, m=np.asarray(m, np.float64), P=np.asarray(proj, np.float64),
           info=np.asarray(json.dumps(info)))
  os.replace(tmp, path)


def load(path: str) -> Dict[str, Any]:
  """{"m": [D], "P": [r, D], "info": dict} from `save`."""
  with np.load(path, allow_pickle=False) as f:
    return {"m": f["m"], "P": f["P"], "info": json.loads(str(f["info"]))}


# ----------------------------------------------------------------------------------------------
# From a config and a workdir.


def _settings(config, kind: str, step: Optional[int]) -> Dict[str, Any]:
  """What a stored whitening depends on; a file is reused only if these match."""
  e = config.extract
  name = config.eval.get("whitening_dataset", "") or config.data.name
  split = config.eval.get("whitening_split", "") or (
      "whiten" if name.startswith("retrieval-sfm") else "train")
  return {"kind": kind, "checkpoint_step": None if step is None else int(step),
          "dataset": name, "split": split,
          "max_pairs": int(config.eval.get("whitening_max_pairs", 0) or 0),
          "pca_dim": int(config.eval.get("whitening_pca_dim", 0) or 0),
          "long_side": int(e.long_side), "scales": [float(s) for s in e.scales],
          "multiscale_combine": str(e.get("multiscale_combine", "gem")),
          "backbone": config.model.backbone, "pooling": config.model.pooling}


def compute_and_save(config, workdir: str, model=None, variables=None, mesh=None,
                     step: Optional[int] = None, kind: Optional[str] = None,
                     describe_fn=None) -> str:
  """Learns the whitening of the network in `workdir` and writes it; returns the path.

  Args:
    config: the experiment config (fields in the module docstring; the data root is
      `config.data.root` or `<workdir>/data`, as training uses).
    workdir: the training workdir (its latest checkpoint, unless model/variables given).
    model, variables, mesh, step: an already restored network (as `cli.restore_model`
      returns); restored from `workdir` when None.
    kind: "learned" or "pca"; default `config.eval.whitening` ("learned" when empty).
    describe_fn: a compiled `extract.make_describe_fn(model, mesh)` to reuse.
  """
  # Imported here: cli imports this module for --mode=evaluate.
  from retrieval_jax import cli  # pylint: disable=import-outside-toplevel
  from retrieval_jax import sharding  # pylint: disable=import-outside-toplevel
  from retrieval_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  kind = kind or requested(config) or "learned"
  if mesh is None:
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  if model is None or variables is None:
    model, variables, step = cli.restore_model(config, workdir, mesh)
  settings = _settings(config, kind, step)
  root = train_lib.data_root(config, workdir)
  train_set = datasets.get_dataset(settings["dataset"], root, settings["split"])
  q, p = training_pairs(train_set, settings["max_pairs"], seed=int(config.seed))
  used = np.unique(np.concatenate([q, p]))  # extract only the images of the pairs
  pos = np.full(len(train_set.images), -1, np.int64)
  pos[used] = np.arange(len(used))
  logging.info("%s whitening of %s/%s: %d pairs over %d images", kind, settings["dataset"],
               settings["split"], len(q), len(used))
  x = extract.extract_descriptors(model, variables, [train_set.images[i] for i in used],
                                  mesh=mesh, describe_fn=describe_fn,
                                  **extract.extract_kwargs(config.extract, variables))
  readable = np.linalg.norm(x, axis=1) > 0
  ok = readable[pos[q]] & readable[pos[p]]
  if not ok.all():
    logging.warning("whitening: %d pairs dropped (unreadable images)", int((~ok).sum()))
  if kind == "learned":
    m, proj = learn(x, kind, pos[q][ok], pos[p][ok], pca_dim=settings["pca_dim"])
  else:
    m, proj = learn(x[readable], kind)
  path = whitening_path(workdir, kind)
  save(path, m, proj, dict(settings, num_pairs=int(ok.sum()), num_images=int(len(used)),
                           dim_in=int(proj.shape[1]), rank=int(proj.shape[0])))
  logging.info("wrote %s (P %s)", path, proj.shape)
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
  want = _settings(config, kind, step)
  stored = load(path) if os.path.exists(path) else None
  if stored is None or any(stored["info"].get(k) != v for k, v in want.items()):
    if stored is not None:
      logging.info("%s is stale (computed for other settings or another checkpoint); "
                   "learning it again", path)
    compute_and_save(config, workdir, model, variables, mesh, step, kind, describe_fn)
    stored = load(path)
  return dict(stored, kind=kind, dim=int(config.eval.get("whitening_dim", 0) or 0))


def save_imported(config, workdir: str, imported) -> Optional[str]:
  """Stores a released network's precomputed learned whitening (cirtorch `meta['Lw']`).

  Picks the entry of `config.eval.whitening_dataset` (case-insensitive, e.g.
  'retrieval-SfM-120k'; the first one when unset or absent) and its multi-scale ('ms') or
  single-scale ('ss') version by `config.extract.scales`, and writes it as `lw.npz` for the
  pretrained network (checkpoint step None), so `get_or_compute` uses it instead of
  learning one. Returns the path, or None when the file has no whitening.
  """
  if not imported.whitening:
    return None
  want = (config.eval.get("whitening_dataset", "") or "").lower()
  names = sorted(imported.whitening)
  name = next((n for n in names if n.lower() == want), names[0])
  kind = "ms" if len(config.extract.scales) > 1 else "ss"
  entry = imported.whitening[name]
  kind = kind if kind in entry else sorted(entry)[0]
  m, proj = entry[kind]
  path = whitening_path(workdir, "learned")
  save(path, m, proj, dict(_settings(config, "learned", None), source=f"meta Lw {name}/{kind}",
                           rank=int(proj.shape[0]), dim_in=int(proj.shape[1])))
  logging.info("using the checkpoint's precomputed whitening %s/%s -> %s", name, kind, path)
  return path

