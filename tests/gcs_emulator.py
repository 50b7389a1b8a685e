"""A local Cloud Storage server for tests: gcp-storage-emulator behind a header-adding proxy.

    python tests/gcs_emulator.py PORT      # serves http://127.0.0.1:PORT until killed

`gcp-storage-emulator` (PyPI) implements the GCS JSON and upload APIs in memory. It omits
the `x-goog-generation` response header that real GCS sends with every object and that
tensorstore's GCS driver (which orbax writes arrays with) requires: without it orbax fails
with "Malformed StorageGeneration" (reported with gcp-storage-emulator 2026.7.19; with
tensorstore 0.1.86 a plain orbax save/restore also went through without it when checked
here, but real GCS always sends it). The proxy forwards every request unchanged and adds
that header, taken from the object's metadata (`generation`), to responses that lack it, so
the server answers as GCS does.

`environment(url)` is what a process needs to use the server for `gs://` paths:
google-cloud-storage and gcsfs read STORAGE_EMULATOR_HOST, tensorstore reads
TENSORSTORE_GCS_HTTP_URL, and EPATH_USE_TF=false keeps etils on gcsfs (with tensorflow
installed it would route gs:// through tf.io.gfile, which ignores the emulator).
"""
import contextlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator
import urllib.parse

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "content-length", "server", "date"}


def environment(url: str) -> Dict[str, str]:
  """Environment variables that send every gs:// access of a process to `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "EPATH_USE_TF": "false",
      # No Google credentials exist here: anonymous access, and no wait on a GCE metadata
      # server that is not there.
      "GCE_METADATA_HOST": "127.0.0.1:9",
      "GCE_METADATA_ROOT": "127.0.0.1:9",
      "GCE_METADATA_IP": "127.0.0.1:9",
      "GOOGLE_CLOUD_PROJECT": "test-project",
      "NO_GCE_CHECK": "true",
  }


def _object_generation(upstream: str, path: str) -> str:
  """The `generation` of the object a media URL names (its metadata, asked upstream)."""
  parsed = urllib.parse.urlsplit(path)
  query = [(k, v) for k, v in urllib.parse.parse_qsl(parsed.query) if k != "alt"]
  path = parsed.path
  if path.startswith("/download/"):  # the media endpoint; metadata lives under /storage/v1
    path = path[len("/download"):]
  conn = http.client.HTTPConnection(upstream, timeout=30)
  try:
    conn.request("GET", path + ("?" + urllib.parse.urlencode(query) if query else ""))
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
      return ""
    with contextlib.suppress(ValueError, AttributeError):
      return str(json.loads(body).get("generation", ""))
    return ""
  finally:
    conn.close()


def make_proxy_handler(upstream: str):
  """A BaseHTTPRequestHandler class forwarding to host:port `upstream`."""

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
      del args

    def _forward(self):
      length = int(self.headers.get("Content-Length") or 0)
      body = self.rfile.read(length) if length else None
      headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
      conn = http.client.HTTPConnection(upstream, timeout=60)
      try:
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
      finally:
        conn.close()
      names = {k.lower() for k, _ in out_headers}
      if resp.status in (200, 201, 206) and "x-goog-generation" not in names:
        generation = ""
        if "json" in (resp.getheader("Content-Type") or ""):
          with contextlib.suppress(ValueError, AttributeError):
            generation = str(json.loads(data).get("generation", ""))
        elif "alt=media" in self.path:
          generation = _object_generation(upstream, self.path)
        if generation:
          out_headers.append(("x-goog-generation", generation))
      self.send_response(resp.status, resp.reason)
      for k, v in out_headers:
        self.send_header(k, v)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  return Handler


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def serve(port: int) -> None:
  """The emulator (in memory, on a free port) and the proxy on `port`; runs until killed."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  upstream_port = free_port()
  emulator = create_server("127.0.0.1", upstream_port, in_memory=True)
  emulator.start()
  proxy = http.server.ThreadingHTTPServer(
      ("127.0.0.1", port), make_proxy_handler(f"127.0.0.1:{upstream_port}"))
  print(f"serving http://127.0.0.1:{port} -> emulator :{upstream_port}", flush=True)
  try:
    proxy.serve_forever()
  finally:
    emulator.stop()


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
  host = urllib.parse.urlsplit(url).netloc
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the storage emulator exited with code {proc.returncode}")
    with contextlib.suppress(OSError):
      conn = http.client.HTTPConnection(host, timeout=2)
      conn.request("GET", "/storage/v1/b?project=test-project")
      if conn.getresponse().status < 500:
        return
    time.sleep(0.2)
  raise TimeoutError(f"the storage emulator did not answer at {url} within {timeout}s")


def create_bucket(url: str, name: str) -> None:
  conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=30)
  conn.request("POST", "/storage/v1/b?project=test-project", body=json.dumps({"name": name}),
               headers={"Content-Type": "application/json"})
  resp = conn.getresponse()
  resp.read()
  if resp.status not in (200, 409):
    raise RuntimeError(f"creating bucket {name}: HTTP {resp.status}")


def list_objects(url: str, bucket: str, prefix: str = ""):
  """Names of the objects in `bucket` under `prefix` (all pages)."""
  names, token = [], None
  host = urllib.parse.urlsplit(url).netloc
  while True:
    q = {"prefix": prefix, **({"pageToken": token} if token else {})}
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("GET", f"/storage/v1/b/{bucket}/o?" + urllib.parse.urlencode(q))
    page = json.loads(conn.getresponse().read())
    names += [o["name"] for o in page.get("items", [])]
    token = page.get("nextPageToken")
    if not token:
      return names


@contextlib.contextmanager
def running(bucket: str = "bucket") -> Iterator[str]:
  """Starts the server in a child process; yields its URL with `bucket` created."""
  port = free_port()
  log = tempfile.TemporaryFile()
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port)],
                          stdout=log, stderr=log, start_new_session=True)
  url = f"http://127.0.0.1:{port}"
  try:
    try:
      _wait_until_up(url, proc)
    except (RuntimeError, TimeoutError) as e:
      log.seek(0)
      raise type(e)(f"{e}\n{log.read().decode(errors='replace')[-3000:]}") from None
    create_bucket(url, bucket)
    yield url
  finally:
    proc.kill()
    proc.wait()
    log.close()


if __name__ == "__main__":
  serve(int(sys.argv[1]))
