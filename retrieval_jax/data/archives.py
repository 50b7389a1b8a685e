"""Archive extraction (tar, tar.gz, tgz, zip) with path-traversal checks.

An archive is extracted into a temporary folder inside the destination, checked member by
member (no absolute paths, no `..`, no links out of the archive, no device files), then
moved into place, so a refused archive leaves nothing behind.
"""
import os
import shutil
import tarfile
from typing import List
import zipfile


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
