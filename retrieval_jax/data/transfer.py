"""One file over HTTP(S) / FTP: resumable, verified, renamed into place only when complete.

Every file is downloaded to `<file>.part`, resumed with an HTTP Range request after an
interruption (a server that ignores Range restarts it from zero), checked, and only then
renamed into place, so a failed or corrupt download never leaves a file a loader would
read. Checks: the byte count announced by the server (Content-Length / Content-Range),
always; SHA-256 / MD5 / size when the caller gives them.
"""
import hashlib
import http.client
import os
import time
from typing import Optional
import urllib.error
import urllib.parse
import urllib.request

from absl import logging


class ChecksumError(RuntimeError):
  """A downloaded file does not match its expected size or digest (it was deleted)."""


class DownloadError(RuntimeError):
  """A file could not be downloaded after the allowed retries."""


def digest(path: str, algo: str) -> str:
  """Hex digest (`algo`: a hashlib name) of a file, read in 1 MiB blocks."""
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
  if sha256 is not None and digest(path, "sha256") != sha256.lower():
    raise ChecksumError(f"{path}: SHA-256 mismatch (expected {sha256})")
  if md5 is not None and digest(path, "md5") != md5.lower():
    raise ChecksumError(f"{path}: MD5 mismatch (expected {md5})")


def fetch_text(url: str, timeout: float) -> str:
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
