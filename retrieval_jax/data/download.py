"""Downloads the retrieval datasets into the layout the loaders in `datasets.py` read.

  python -m retrieval_jax.data.download NAME --dir D [--dry-run] [--keep-archives]
      [--splits metadata,train,index,test] [--max-archives N]

NAME: retrieval-sfm-120k (also creates the retrieval-SfM-30k whitening files), roxford5k,
rparis6k, oxford5k, paris6k, revisitop1m, holidays, ukbench, gldv2. The URLs are the ones
of the reference scripts (cirtorch `download.py`, revisitop `download.py`, the GLDv2
`download-dataset.sh`, the INRIA Holidays and UKBench pages).

Every file is downloaded to `<file>.part`, resumed with an HTTP Range request after an
interruption (a server that ignores Range restarts it from zero), checked, and only then
renamed into place, so a failed or corrupt download never leaves a file a loader would
read. Checks:
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
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import time
from typing import Dict, List, Optional, Sequence, Tuple
import urllib.error
import urllib.parse
import urllib.request
import zipfile

from absl import logging

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

DATASETS = ("retrieval-sfm-120k", "retrieval-sfm-30k", "roxford5k", "rparis6k",
            "oxford5k", "paris6k", "revisitop1m", "holidays", "ukbench", "gldv2")
GLDV2_SPLITS = {"train": 500, "index": 100, "test": 20}


class ChecksumError(RuntimeError):
  """A downloaded file does not match its expected size or digest (it was deleted)."""


class DownloadError(RuntimeError):
  """A file could not be downloaded after the allowed retries."""


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
    name: one of DATASETS.
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
  raise ValueError(f"unknown dataset {name!r}; known: {list(DATASETS)}")


# ----------------------------------------------------------------------------------------
# Downloading.


def _digest(path: str, algo: str) -> str:
  h = hashlib.new(algo)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def verify_file(path: str, sha256: Optional[str] = None, md5: Optional[str] = None,
                size: Optional[int] = None) -> None:
  """Raises ChecksumError unless `path` has the given size / digests."""
  if size is not None and os.path.getsize(path) != size:
    raise ChecksumError(f"{path}: size {os.path.getsize(path)} != expected {size}")
  if sha256 is not None and _digest(path, "sha256") != sha256.lower():
    raise ChecksumError(f"{path}: SHA-256 mismatch (expected {sha256})")
  if md5 is not None and _digest(path, "md5") != md5.lower():
    raise ChecksumError(f"{path}: MD5 mismatch (expected {md5})")


def _fetch_text(url: str, timeout: float) -> str:
  with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (fixed URLs)
    return r.read().decode("utf-8", "replace")


def _total_from_headers(resp, offset: int) -> Optional[int]:
  """Full file size from Content-Range ('bytes a-b/total') or Content-Length."""
  cr = resp.headers.get("Content-Range")
  if cr and "/" in cr and not cr.endswith("/*"):
    return int(cr.rsplit("/", 1)[1])
  cl = resp.headers.get("Content-Length")
  if cl is not None:
    return offset + int(cl)
  return None


def _transfer(url: str, part: str, timeout: float, chunk_size: int) -> None:
  """One attempt: appends to `part` from its current size; raises on a short read."""
  offset = os.path.getsize(part) if os.path.exists(part) else 0
  scheme = urllib.parse.urlparse(url).scheme
  headers = {"User-Agent": "retrieval_jax-download"}
  if offset and scheme in ("http", "https"):
    headers["Range"] = f"bytes={offset}-"
  elif offset:
    offset = 0  # no resume for ftp / file: start over
  req = urllib.request.Request(url, headers=headers)
  try:
    resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310
  except urllib.error.HTTPError as e:
    if e.code == 416 and offset:
      # Range past the end: the .part may already be complete.
      total = _total_from_headers(e, 0) if e.headers.get("Content-Range") else None
      if total == offset:
        return
      os.remove(part)
    raise
  with resp:
    status = getattr(resp, "status", 200)
    if offset and status != 206:
      logging.info("%s: server ignored the Range request; restarting", url)
      offset = 0
    if status == 206:
      cr = resp.headers.get("Content-Range", "")
      start = int(cr.split()[1].split("-")[0]) if cr.startswith("bytes ") else -1
      if start != offset:
        raise DownloadError(f"{url}: asked for bytes from {offset}, got {cr!r}")
    total = _total_from_headers(resp, offset)
    written = offset
    last_log = time.monotonic()
    with open(part, "ab" if offset else "wb") as f:
      while True:
        block = resp.read(chunk_size)
        if not block:
          break
        f.write(block)
        written += len(block)
        if time.monotonic() - last_log > 10:
          last_log = time.monotonic()
          logging.info("%s: %.1f / %s MB", os.path.basename(part[:-5]), written / 1e6,
                       f"{total / 1e6:.1f}" if total else "?")
  if total is not None and written != total:
    raise DownloadError(f"{url}: connection closed at {written} of {total} bytes")


def download_file(url: str, dest: str, *, sha256: Optional[str] = None,
                  md5: Optional[str] = None, size: Optional[int] = None,
                  retries: int = 3, timeout: float = 60.0,
                  chunk_size: int = 1 << 20, retry_wait: float = 2.0) -> str:
  """Downloads `url` to `dest` (resumable, verified, atomic rename).

  Args:
    url: http(s) URL (ftp and file URLs work without resume).
    dest: destination path; the transfer goes to `dest + '.part'`.
    sha256, md5, size: expected values, checked when given.
    retries: extra attempts after a failed or short transfer (each resumes).
    timeout: socket timeout in seconds.
    chunk_size: read size in bytes.
    retry_wait: seconds between attempts.

  Returns:
    `dest`.

  Raises:
    ChecksumError: the completed file does not match; the `.part` file is deleted.
    DownloadError / urllib.error.URLError: every attempt failed; the `.part` is kept
      for a later resume.
  """
  checked = sha256 is not None or md5 is not None or size is not None
  if os.path.exists(dest):
    if not checked:
      return dest  # only complete, verified files are ever renamed to `dest`
    try:
      verify_file(dest, sha256=sha256, md5=md5, size=size)
      return dest
    except ChecksumError as e:
      logging.warning("%s; downloading it again", e)
      os.remove(dest)
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  part = dest + ".part"
  if size is not None and os.path.exists(part) and os.path.getsize(part) > size:
    os.remove(part)
  for attempt in range(retries + 1):
    if size is not None and os.path.exists(part) and os.path.getsize(part) == size:
      break
    try:
      _transfer(url, part, timeout, chunk_size)
      break
    except (DownloadError, urllib.error.URLError, OSError,
            http.client.HTTPException) as e:
      if isinstance(e, urllib.error.HTTPError) and e.code in (403, 404, 410):
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
      if attempt == retries:
        raise DownloadError(f"{url}: failed after {retries + 1} attempts: {e}") from e
      logging.warning("%s: %s; retrying (%d/%d)", url, e, attempt + 1, retries)
      time.sleep(retry_wait)
  try:
    verify_file(part, sha256=sha256, md5=md5, size=size)
  except ChecksumError:
    os.remove(part)  # never keep a corrupt file around, not even for resuming
    raise
  os.replace(part, dest)
  return dest


# ----------------------------------------------------------------------------------------
# Extraction.


def _check_member_path(name: str, archive: str) -> None:
  norm = os.path.normpath(name)
  if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep) or (
      len(name) > 1 and name[1] == ":"):
    raise ValueError(f"{archive}: unsafe path in archive: {name!r}")


def _extract_to(archive: str, out_dir: str) -> None:
  if tarfile.is_tarfile(archive):
    with tarfile.open(archive) as tar:
      members = tar.getmembers()
      for m in members:
        _check_member_path(m.name, archive)
        if m.issym() or m.islnk():
          # Symlink targets are relative to the member's folder, hard links to the root.
          base = os.path.dirname(m.name) if m.issym() else ""
          target = os.path.normpath(os.path.join(base, m.linkname))
          if os.path.isabs(m.linkname) or target == ".." or target.startswith(
              ".." + os.sep):
            raise ValueError(f"{archive}: link escapes the archive: {m.name!r}")
        if m.isdev():
          raise ValueError(f"{archive}: device file in archive: {m.name!r}")
      if hasattr(tarfile, "data_filter"):
        tar.extractall(out_dir, members=members, filter="data")
      else:
        tar.extractall(out_dir, members=members)  # paths checked above
  elif zipfile.is_zipfile(archive):
    with zipfile.ZipFile(archive) as zf:
      for name in zf.namelist():
        _check_member_path(name, archive)
      zf.extractall(out_dir)
  else:
    raise ValueError(f"{archive}: not a tar or zip archive")


def _merge_move(src: str, dst: str) -> None:
  """Moves the tree `src` into `dst`, merging folders that already exist."""
  os.makedirs(dst, exist_ok=True)
  for entry in os.listdir(src):
    s, d = os.path.join(src, entry), os.path.join(dst, entry)
    if os.path.isdir(s) and not os.path.islink(s) and os.path.isdir(d):
      _merge_move(s, d)
    else:
      os.replace(s, d)


def extract_archive(archive: str, dest_dir: str, flatten: bool = False) -> List[str]:
  """Extracts a tar / tar.gz / tgz / zip archive into `dest_dir`.

  Args:
    archive: the archive file.
    dest_dir: output folder (created; existing content is kept and merged).
    flatten: put every regular file directly in `dest_dir`, dropping the archive's
      folders (two files with one name raise ValueError).

  Returns:
    Paths of the files now in `dest_dir` that came from the archive.
  """
  os.makedirs(dest_dir, exist_ok=True)
  tmp = os.path.join(dest_dir, f".tmp-extract-{os.path.basename(archive)}")
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    _extract_to(archive, tmp)
    files = []
    for dirpath, _, filenames in os.walk(tmp):
      for fn in filenames:
        files.append(os.path.join(dirpath, fn))
    if flatten:
      out = []
      for src in sorted(files):
        dst = os.path.join(dest_dir, os.path.basename(src))
        if dst in out:
          raise ValueError(f"{archive}: two files named {os.path.basename(src)!r}")
        os.replace(src, dst)
        out.append(dst)
      return out
    _merge_move(tmp, dest_dir)
    return [os.path.join(dest_dir, os.path.relpath(f, tmp)) for f in files]
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# Datasets.


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
    md5 = _fetch_text(res.md5_url, timeout).split()[0]
  logging.info("Downloading %s -> %s", res.url, dest)
  download_file(res.url, dest, sha256=res.sha256, md5=md5, size=res.size,
                timeout=timeout, retries=retries)
  if res.extract_to:
    out = os.path.join(root, res.extract_to)
    logging.info("Extracting %s -> %s", dest, out)
    extract_archive(dest, out, flatten=res.flatten)
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
  parser.add_argument("name", choices=DATASETS)
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
