"""Oxford5k / Paris6k, their Revisited versions and the revisitop1m distractors.

Layout (cirtorch `configdataset` / `download_test`, revisitop `configdataset`):

  root/test/<name>/gnd_<name>.pkl   {'imlist', 'qimlist', 'gnd'}; names without '.jpg';
      Revisited gnd[i]: 'bbx', 'easy', 'hard', 'junk'; old gnd[i]: 'bbx', 'ok', 'junk'
  root/test/<name>/jpg/<imname>.jpg (roxford5k/jpg links to oxford5k/jpg)
  root/test/revisitop1m/revisitop1m.txt   one path per line, relative to jpg/, extension
      included (the reference uses ext '')

The old Oxford5k / Paris6k can also be read from the original Oxford ground-truth text
files (`<landmark>_<n>_{query,good,ok,junk}.txt`, query line `name x1 y1 x2 y2`, Oxford
names prefixed 'oxc1_') with `gt_dir=...`: the database is then every `*.jpg` in `jpg/`
in sorted order, 'ok' = good + ok, 'junk' = junk, as in the original protocol.
"""
import glob
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import numpy as np

from retrieval_jax.data import datasets

SPLITS = ("test",)  # the loader's splits, declared to datasets.register

_REVISITED = ("roxford5k", "rparis6k")
_OLD = ("oxford5k", "paris6k")
_GND_KEYS = ("easy", "hard", "junk", "ok")


def _image_dir(root: str, name: str) -> str:
  return os.path.join(root, "test", name, "jpg")


def _convert_gnd(raw: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[Any]]:
  gnd, bbxs = [], []
  for g in raw:
    out = {}
    for key in _GND_KEYS:
      if key in g:
        out[key] = datasets.as_index_array(g[key])
    bbx = g.get("bbx")
    if bbx is not None:
      bbx = tuple(float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1))
      if len(bbx) != 4:
        raise ValueError(f"bounding box must have 4 values, got {bbx}")
    out["bbx"] = bbx
    bbxs.append(bbx)
    gnd.append(out)
  return gnd, bbxs


def _from_pickle(name: str, root: str, check_images: bool) -> datasets.RetrievalSet:
  gnd_fname = os.path.join(root, "test", name, f"gnd_{name}.pkl")
  datasets.require(gnd_fname, name, root)
  cfg = datasets.safe_load_pickle(gnd_fname)
  img_dir = _image_dir(root, name)
  if check_images:
    datasets.require(img_dir, name, root, what="image folder")
  imlist, qimlist = list(cfg["imlist"]), list(cfg["qimlist"])
  if len(cfg["gnd"]) != len(qimlist):
    raise ValueError(f"{gnd_fname}: {len(cfg['gnd'])} gnd entries, {len(qimlist)} queries")
  gnd, bbxs = _convert_gnd(cfg["gnd"])
  for i, g in enumerate(gnd):
    for key in _GND_KEYS:
      if key in g and len(g[key]) and (g[key].min() < 0 or g[key].max() >= len(imlist)):
        raise ValueError(f"{gnd_fname}: query {i} '{key}' index out of range")
  return datasets.RetrievalSet(
      name=name,
      query_images=[os.path.join(img_dir, q + ".jpg") for q in qimlist],
      db_images=[os.path.join(img_dir, n + ".jpg") for n in imlist],
      query_bbx=bbxs,
      gnd=gnd)


def _read_names(path: str) -> List[str]:
  with open(path) as f:
    return [line.split()[0] for line in f if line.strip()]


def _from_gt_txt(name: str, root: str, gt_dir: str) -> datasets.RetrievalSet:
  """Builds the old Oxford/Paris ground truth from the original text files."""
  img_dir = _image_dir(root, name)
  datasets.require(img_dir, name, root, what="image folder")
  imlist = sorted(os.path.splitext(os.path.basename(p))[0]
                  for p in glob.glob(os.path.join(img_dir, "*.jpg")))
  if not imlist:
    raise datasets.DatasetNotFoundError(
        f"{name}: no .jpg images in {img_dir}\n  Download them with: "
        f"{datasets.download_command(name, root)}")
  pos = {n: i for i, n in enumerate(imlist)}
  qfiles = glob.glob(os.path.join(gt_dir, "*_query.txt"))
  if not qfiles:
    raise datasets.DatasetNotFoundError(f"{name}: no *_query.txt files in {gt_dir}")

  def key(p):
    m = re.match(r"(.+)_(\d+)_query\.txt$", os.path.basename(p))
    return (m.group(1), int(m.group(2))) if m else (os.path.basename(p), 0)

  qimlist, gnd, bbxs, n_unknown = [], [], [], 0
  for qf in sorted(qfiles, key=key):
    with open(qf) as f:
      parts = f.read().split()
    qname = re.sub(r"^oxc1_", "", parts[0])
    bbx = tuple(float(v) for v in parts[1:5])
    stem = qf[:-len("_query.txt")]
    lists = {}
    for kind in ("good", "ok", "junk"):
      names = _read_names(f"{stem}_{kind}.txt")
      n_unknown += sum(n not in pos for n in names)
      lists[kind] = sorted(pos[n] for n in names if n in pos)
    qimlist.append(qname)
    bbxs.append(bbx)
    gnd.append({"ok": np.asarray(sorted(set(lists["good"]) | set(lists["ok"])), np.int64),
                "junk": np.asarray(lists["junk"], np.int64), "bbx": bbx})
  if n_unknown:
    # Paris6k's 20 corrupt images are often deleted; they then drop out of the gnd too.
    logging.warning("%s: %d ground-truth entries name images absent from %s",
                    name, n_unknown, img_dir)
  return datasets.RetrievalSet(
      name=name,
      query_images=[os.path.join(img_dir, q + ".jpg") for q in qimlist],
      db_images=[os.path.join(img_dir, n + ".jpg") for n in imlist],
      query_bbx=bbxs, gnd=gnd)


def load_revisitop1m_list(root: str) -> List[str]:
  """Paths of the 1M distractor images (`revisitop1m.txt`, relative to `jpg/`)."""
  list_fname = os.path.join(root, "test", "revisitop1m", "revisitop1m.txt")
  datasets.require(list_fname, "revisitop1m", root)
  img_dir = os.path.join(root, "test", "revisitop1m", "jpg")
  with open(list_fname) as f:
    return [os.path.join(img_dir, line.strip()) for line in f if line.strip()]


def add_distractors(rset: datasets.RetrievalSet, distractors: List[str],
                    name: Optional[str] = None) -> datasets.RetrievalSet:
  """Appends distractor images to the database; gnd indices stay valid."""
  return datasets.RetrievalSet(
      name=name or rset.name + "+1m",
      query_images=rset.query_images,
      db_images=list(rset.db_images) + list(distractors),
      query_bbx=rset.query_bbx, gnd=rset.gnd,
      query_labels=rset.query_labels,
      db_labels=(None if rset.db_labels is None else np.concatenate(
          [rset.db_labels, np.full((len(distractors),), -1, np.int64)])),
      rotations=rset.rotations)


def _make_loader(name: str):
  def load(root: str, split: str = "test", check_images: bool = True,
           gt_dir: Optional[str] = None) -> datasets.RetrievalSet:
    datasets.check_split(name, split, SPLITS)
    if gt_dir is not None:
      if name not in _OLD:
        raise ValueError(f"{name}: gt_dir is only for the old oxford5k / paris6k")
      return _from_gt_txt(name, root, gt_dir)
    return _from_pickle(name, root, check_images)
  load.__name__ = f"load_{name}"
  load.__doc__ = (
      f"{name}: RetrievalSet(query_images, db_images, query_bbx, gnd).\n\n"
      "Args:\n  root: data root.\n  split: 'test'.\n"
      "  check_images: require the jpg/ folder to exist.\n"
      "  gt_dir: (oxford5k / paris6k) read the original ground-truth text files.\n")
  return load


def _make_plus1m_loader(name: str):
  base = _make_loader(name)

  def load(root: str, split: str = "test", check_images: bool = True
           ) -> datasets.RetrievalSet:
    rset = base(root, split, check_images=check_images)
    return add_distractors(rset, load_revisitop1m_list(root), name=f"{name}+1m")
  load.__name__ = f"load_{name}_plus1m"
  load.__doc__ = f"{name} with the revisitop1m distractors appended to the database."
  return load


# cirtorch's test sets and revisitop never apply the EXIF orientation (their boxes are in
# the stored frame).
for _name in _REVISITED + _OLD:
  datasets.register(_name, default_split="test", splits=SPLITS, exif_transpose=False,
                    download=_name)(_make_loader(_name))
for _name in _REVISITED:
  datasets.register(f"{_name}+1m", default_split="test", splits=SPLITS,
                    exif_transpose=False, download="revisitop1m")(_make_plus1m_loader(_name))


@datasets.register("revisitop1m", default_split="test", splits=SPLITS,
                   exif_transpose=False, download="revisitop1m")
def load_revisitop1m(root: str, split: str = "test") -> datasets.RetrievalSet:
  """The 1M distractors alone: no queries, `db_images` from revisitop1m.txt."""
  datasets.check_split("revisitop1m", split, SPLITS)
  return datasets.RetrievalSet(name="revisitop1m", query_images=[],
                               db_images=load_revisitop1m_list(root), gnd=[])
