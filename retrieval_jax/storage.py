"""Files in the workdir, local or in a bucket: every path goes through `etils.epath`.

`gs://bucket/run` (and any URL epath supports: s3://, ...) works wherever a local folder
does: orbax writes checkpoints there itself, and the helpers here write the rest (metrics,
results, pictures, descriptors, whitening, tuples). Local paths become absolute; URLs stay
as they are (`os.path.abspath("gs://b/r")` would make a local folder `./gs:/b/r`). Object
stores cannot append or memory-map: appended files are rewritten whole, and folders that are
filled in place (descriptors) are staged in a local temporary folder and uploaded when
complete.
"""
import io
import os
from typing import Union
import uuid

from etils import epath
import numpy as np

from retrieval_jax import errors

PathLike = Union[str, os.PathLike]


class WorkdirError(errors.UserError, OSError):
  """The workdir (or a folder in it, or a bucket) cannot be written: a user error (exit 2)."""


def is_remote(path: PathLike) -> bool:
  """True for URLs such as gs://bucket/run (anything with a scheme)."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
  """Absolute local path, or the URL unchanged (never a local `gs:` folder)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base: PathLike, *parts: str) -> str:
  return os.fspath(epath.Path(base).joinpath(*parts)) if is_remote(base) else os.path.join(
      base, *parts)


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def listdir(path: PathLike) -> list:
  p = epath.Path(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def remove(path: PathLike) -> None:
  epath.Path(path).unlink()


def makedirs(path: PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def open_file(path: PathLike, mode: str = "r"):
  """`open` for local paths and URLs; "w" modes create the parent folder."""
  p = epath.Path(path)
  if any(m in mode for m in "wax"):
    p.parent.mkdir(parents=True, exist_ok=True)
  return p.open(mode)


def write_text(path: PathLike, text: str) -> None:
  with open_file(path, "w") as f:
    f.write(text)


def read_text(path: PathLike) -> str:
  return epath.Path(path).read_text()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Whole-file write; locally via a temporary name and a rename (never a torn file)."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    p.write_bytes(data)  # an object appears only once complete
    return
  tmp = f"{os.fspath(path)}.tmp{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, os.fspath(path))


def save_npz(path: PathLike, **arrays) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def load_npz(path: PathLike) -> dict:
  with epath.Path(path).open("rb") as f:
    with np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}


def check_writable(workdir: PathLike) -> None:
  """Creates the workdir and writes/deletes a probe file; raises WorkdirError naming it.

  Called before any compute, so a typo in a bucket name or a read-only folder costs seconds,
  not a compiled model.
  """
  probe = epath.Path(join(workdir, f".write_probe_{uuid.uuid4().hex[:8]}"))
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except (any backend's error, reported)
    raise WorkdirError(
        f"cannot write the workdir {os.fspath(workdir)}: {type(e).__name__}: {e}. Check that "
        "the folder or bucket exists and that this machine may write to it (for gs://: "
        "`gcloud storage ls` it, and the credentials)") from e


def upload_folder(local: str, remote: PathLike, last: str = "") -> None:
  """Copies the files of local folder `local` (recursively) to `remote`; `last` (a top-level
  file name, e.g. a completion marker) after all others."""
  dst = epath.Path(remote)
  dst.mkdir(parents=True, exist_ok=True)
  deferred = []
  for root, _, files in os.walk(local):
    rel = os.path.relpath(root, local)
    target = dst if rel == "." else dst / rel
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(files):
      if rel == "." and name == last:
        deferred.append((os.path.join(root, name), target / name))
        continue
      with open(os.path.join(root, name), "rb") as f:
        (target / name).write_bytes(f.read())
  for src, target in deferred:
    with open(src, "rb") as f:
      target.write_bytes(f.read())


def download_folder(remote: PathLike, local: str) -> None:
  """Copies the files of `remote` (one level) into local folder `local`."""
  os.makedirs(local, exist_ok=True)
  for child in epath.Path(remote).iterdir():
    if child.is_file():
      with open(os.path.join(local, child.name), "wb") as f:
        f.write(child.read_bytes())
