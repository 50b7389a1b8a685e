"""Downloads the retrieval datasets into the layout the loaders in `datasets.py` read.

  python -m retrieval_jax.data.download NAME --dir D [--dry-run] [--keep-archives]
      [--splits metadata,train,index,test] [--max-archives N]

NAME: retrieval-sfm-120k (also creates the retrieval-SfM-30k whitening files), roxford5k,
rparis6k, oxford5k, paris6k, revisitop1m, holidays, ukbench, gldv2. The URLs are the ones
of the reference scripts (cirtorch `download.py`, revisitop `download.py`, the GLDv2
`download-dataset.sh`, the INRIA Holidays and UKBench pages).

This module holds the dataset file tables (`plan`) and the command line; the transport is
`transfer.py`, the extraction `archives.py`. Every file is downloaded to `<file>.part`,
resumed with an HTTP Range request after an interruption (a server that ignores Range
restarts it from zero), checked, and only then renamed into place, so a failed or corrupt
download never leaves a file a loader would read. Checks:
  * the byte count announced by the server (Content-Length / Content-Range), always;
  * SHA-256 / MD5 / size from `CHECKSUMS` when known. We know none of the official
    files' digests (the reference scripts publish none), so the table is empty and only
    the server's byte count is verified, except for
  * GLDv2 archives, checked against the official per-archive MD5 files
    (md5sum/<split>/md5.images_NNN.txt).
Archives (tar, tar.gz, tgz, zip) are extracted with path-traversal checks into a
temporary folder, moved into place, marked done (`.extracted-<archive>`) so a rerun
skips them, and deleted unless --keep-archives.
"""
import argparse
import dataclasses
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging

from retrieval_jax.data import archives
from retrieval_jax.data import datasets
from retrieval_jax.data import transfer

CIRTORCH_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data"
OXFORD_URL = "http://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
PARIS_URL = "http://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
REVISITOP1M_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
HOLIDAYS_URL = "ftp://ftp.inrialpes.fr/pub/lear/douze/data"
UKBENCH_URL = "http://vis.uky.edu/~stewe/ukbench"
GLDV2_URL = "https://s3.amazonaws.com/google-landmark"

# url -> {'sha256': hex, 'md5': hex, 'size': bytes}. No official digest or size is known
# for these files (the reference scripts publish none); add them here when you have
# verified ones. Until then only the server's announced byte count is checked.
CHECKSUMS: Dict[str, Dict[str, object]] = {}

GLDV2_SPLITS = {"train": 500, "index": 100, "test": 20}


@dataclasses.dataclass(frozen=True)
class Resource:
  """One file to fetch.

  Attributes:
    url: source URL.
    dest: destination file, relative to the data root.
    extract_to: if set, the archive is extracted into this folder (relative to root).
    flatten: move every extracted file to the top of `extract_to` (the Oxford / Paris
      archives hold nested folders, the reference flattens them into jpg/).
    sha256, md5, size: expected digest / byte count, when known.
    md5_url: URL of a small text file whose first token is the file's MD5.
  """
  url: str
  dest: str
  extract_to: Optional[str] = None
  flatten: bool = False
  sha256: Optional[str] = None
  md5: Optional[str] = None
  size: Optional[int] = None
  md5_url: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """Files to fetch plus symlinks (link, target relative to the link's folder)."""
  resources: Tuple[Resource, ...]
  symlinks: Tuple[Tuple[str, str], ...] = ()


def _res(url: str, dest: str, **kw) -> Resource:
  known = CHECKSUMS.get(url, {})
  for k in ("sha256", "md5", "size"):
    if k in known and k not in kw:
      kw[k] = known[k]
  return Resource(url=url, dest=dest, **kw)


def _oxford_images(name: str) -> List[Resource]:
  if name == "oxford5k":
    return [_res(f"{OXFORD_URL}/oxbuild_images-v1.tgz",
                 "test/oxford5k/oxbuild_images-v1.tgz",
                 extract_to="test/oxford5k/jpg", flatten=True)]
  return [_res(f"{PARIS_URL}/{f}", f"test/paris6k/{f}", extract_to="test/paris6k/jpg",
               flatten=True) for f in ("paris_1-v1.tgz", "paris_2-v1.tgz")]


def _gnd(name: str) -> Resource:
  return _res(f"{CIRTORCH_URL}/test/{name}/gnd_{name}.pkl", f"test/{name}/gnd_{name}.pkl")


def plan(name: str, splits: Optional[Sequence[str]] = None,
         max_archives: Optional[int] = None) -> Plan:
  """What `download(name, ...)` fetches.

  Args:
    name: one of `datasets.download_names()` (the registered datasets' download names).
    splits: for gldv2, any of 'metadata', 'train', 'index', 'test' (default: all).
    max_archives: fetch at most this many image archives per split (revisitop1m,
      gldv2), for a partial copy.

  Returns:
    A Plan.
  """
  def cap(n):
    return n if max_archives is None else min(n, max_archives)

  if name in ("retrieval-sfm-120k", "retrieval-sfm-30k"):
    dbs = f"{CIRTORCH_URL}/train/dbs"
    return Plan(
        resources=(
            _res(f"{CIRTORCH_URL}/train/ims/ims.tar.gz",
                 "train/retrieval-SfM-120k/ims.tar.gz",
                 extract_to="train/retrieval-SfM-120k/ims"),
            _res(f"{dbs}/retrieval-SfM-120k.pkl",
                 "train/retrieval-SfM-120k/retrieval-SfM-120k.pkl"),
            _res(f"{dbs}/retrieval-SfM-120k-whiten.pkl",
                 "train/retrieval-SfM-120k/retrieval-SfM-120k-whiten.pkl"),
            _res(f"{dbs}/retrieval-SfM-30k-whiten.pkl",
                 "train/retrieval-SfM-30k/retrieval-SfM-30k-whiten.pkl"),
        ),
        symlinks=(("train/retrieval-SfM-30k/ims", "../retrieval-SfM-120k/ims"),))
  if name in ("oxford5k", "paris6k"):
    return Plan(resources=tuple(_oxford_images(name)) + (_gnd(name),))
  if name in ("roxford5k", "rparis6k"):
    old = name[1:]
    return Plan(resources=tuple(_oxford_images(old)) + (_gnd(name),),
                symlinks=((f"test/{name}/jpg", f"../{old}/jpg"),))
  if name == "revisitop1m":
    res = [_res(f"{REVISITOP1M_URL}/jpg/revisitop1m.{i + 1}.tar.gz",
                f"test/revisitop1m/revisitop1m.{i + 1}.tar.gz",
                extract_to="test/revisitop1m/jpg") for i in range(cap(100))]
    res.append(_res(f"{REVISITOP1M_URL}/revisitop1m.txt", "test/revisitop1m/revisitop1m.txt"))
    return Plan(resources=tuple(res))
  if name == "holidays":
    return Plan(resources=tuple(
        _res(f"{HOLIDAYS_URL}/{f}", f"test/holidays/{f}", extract_to="test/holidays/jpg",
             flatten=True) for f in ("jpg1.tar.gz", "jpg2.tar.gz")))
  if name == "ukbench":
    return Plan(resources=(_res(f"{UKBENCH_URL}/ukbench.zip", "test/ukbench/ukbench.zip",
                                extract_to="test/ukbench"),))
  if name == "gldv2":
    splits = tuple(splits or ("metadata",) + tuple(GLDV2_SPLITS))
    unknown = set(splits) - {"metadata", *GLDV2_SPLITS}
    if unknown:
      raise ValueError(f"gldv2: unknown splits {sorted(unknown)}")
    res = []
    if "metadata" in splits:
      for f in ("train.csv", "train_clean.csv", "train_label_to_category.csv",
                "index.csv", "index_image_to_landmark.csv", "test.csv"):
        res.append(_res(f"{GLDV2_URL}/metadata/{f}", f"gldv2/{f}"))
      for f in ("retrieval_solution_v2.1.csv", "recognition_solution_v2.1.csv"):
        res.append(_res(f"{GLDV2_URL}/ground_truth/{f}", f"gldv2/{f}"))
    for split, n in GLDV2_SPLITS.items():
      if split not in splits:
        continue
      for i in range(cap(n)):
        tar = f"images_{i:03d}.tar"
        res.append(_res(f"{GLDV2_URL}/{split}/{tar}", f"gldv2/{split}/{tar}",
                        extract_to=f"gldv2/{split}",
                        md5_url=f"{GLDV2_URL}/md5sum/{split}/md5.images_{i:03d}.txt"))
    return Plan(resources=tuple(res))
  raise ValueError(f"unknown dataset {name!r}; known: {datasets.download_names()}")


def _marker(root: str, res: Resource) -> str:
  return os.path.join(root, res.extract_to, f".extracted-{os.path.basename(res.dest)}")


def fetch(res: Resource, root: str, keep_archives: bool = False,
          timeout: float = 60.0, retries: int = 3) -> None:
  """Downloads (and extracts) one resource under `root`; skips what is already done."""
  dest = os.path.join(root, res.dest)
  if res.extract_to and os.path.exists(_marker(root, res)):
    logging.info("%s: already extracted", res.dest)
    return
  md5 = res.md5
  if md5 is None and res.md5_url is not None and not os.path.exists(dest):
    md5 = transfer.fetch_text(res.md5_url, timeout).split()[0]
  logging.info("Downloading %s -> %s", res.url, dest)
  transfer.download_file(res.url, dest, sha256=res.sha256, md5=md5, size=res.size,
                         timeout=timeout, retries=retries)
  if res.extract_to:
    out = os.path.join(root, res.extract_to)
    logging.info("Extracting %s -> %s", dest, out)
    archives.extract_archive(dest, out, flatten=res.flatten)
    with open(_marker(root, res), "w") as f:
      f.write(res.url + "\n")
    if not keep_archives:
      os.remove(dest)


def _make_symlink(root: str, link: str, target: str) -> None:
  path = os.path.join(root, link)
  if os.path.lexists(path):
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  os.symlink(target, path)


def download(name: str, root: str, *, splits: Optional[Sequence[str]] = None,
             max_archives: Optional[int] = None, keep_archives: bool = False,
             dry_run: bool = False, timeout: float = 60.0, retries: int = 3) -> Plan:
  """Downloads dataset `name` into data root `root` (see the module docstring).

  Returns:
    The executed (or, with dry_run, the planned) Plan.
  """
  p = plan(name, splits=splits, max_archives=max_archives)
  if dry_run:
    return p
  for res in p.resources:
    fetch(res, root, keep_archives=keep_archives, timeout=timeout, retries=retries)
  for link, target in p.symlinks:
    _make_symlink(root, link, target)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m retrieval_jax.data.download",
      description="Download a retrieval dataset into the layout the loaders read.")
  parser.add_argument("name", choices=datasets.download_names())
  parser.add_argument("--dir", required=True, help="data root (get_dataset's root)")
  parser.add_argument("--splits", default=None,
                      help="gldv2 only: comma list of metadata,train,index,test")
  parser.add_argument("--max-archives", type=int, default=None,
                      help="at most N image archives per split (partial copy)")
  parser.add_argument("--keep-archives", action="store_true")
  parser.add_argument("--dry-run", action="store_true", help="print the plan only")
  parser.add_argument("--timeout", type=float, default=60.0)
  parser.add_argument("--retries", type=int, default=3)
  args = parser.parse_args(argv)
  splits = args.splits.split(",") if args.splits else None
  logging.set_verbosity(logging.INFO)
  p = download(args.name, args.dir, splits=splits, max_archives=args.max_archives,
               keep_archives=args.keep_archives, dry_run=args.dry_run,
               timeout=args.timeout, retries=args.retries)
  for res in p.resources:
    check = ("sha256" if res.sha256 else "md5" if (res.md5 or res.md5_url)
             else "size" if res.size else "server byte count only")
    extra = f" -> extract to {res.extract_to}" if res.extract_to else ""
    print(f"{res.url} -> {os.path.join(args.dir, res.dest)}{extra} [{check}]")
  for link, target in p.symlinks:
    print(f"symlink {os.path.join(args.dir, link)} -> {target}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
