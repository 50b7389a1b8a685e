"""--mode=serve: the JSON API, every refused input, the served files, and a real browser.

A nested folder of real photographs (scikit-image) is described by `--mode=describe` with
the tiny random ResNet (written as a weight file, `model.pretrained`), then served by the
mode's own uvicorn server on a free port of 127.0.0.1, in a thread of this process. The
search answers are checked against `--mode=search`'s results.json for the same query and
against a numpy ranking of the stored descriptors. The browser test drives Debian's
`chromium` (headless, `--dump-dom` / `--screenshot`) through the page's `?query=` parameter.
"""
import concurrent.futures
import http.client
import io
import json
import os
import shutil
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
from PIL import Image
import pytest

from configs import common
from retrieval_jax import descriptor_store
from retrieval_jax import run
from retrieval_jax.models import weight_files
from retrieval_jax.search_page import app as app_lib
import tiny_models  # pylint: disable=g-bad-import-order

MAX_BYTES = 150_000
PHOTOS = ("a/astronaut.jpg", "a/coffee.jpg", "b/sub/chelsea.png", "b/rocket.jpg",
          "c/camera.jpg", "c/coins.jpg")


def _config(tmp, root):
  c = common.base_config()
  c.model.backbone = "resnet18"
  c.model.backbone_kwargs = {"width": 8, "stage_sizes": (1, 1, 1, 1)}
  model = tiny_models.tiny_resnet("gem")
  weights = str(tmp / "tiny.npz")
  variables = tiny_models.random_variables(model, image_size=32)
  # A trunk weight file, as `python -m retrieval_jax.models.pretrained` writes one.
  weight_files.save_npz({col: tree["backbone"] for col, tree in variables.items()}, weights)
  c.model.pretrained = weights
  c.data.image_size = 32
  c.extract.long_side = 64
  c.extract.batch_size = 4
  c.describe.images = root
  c.serve.port = 0  # any free port
  c.serve.max_bytes = MAX_BYTES
  c.search.k = 3
  return c


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  from skimage import data  # pylint: disable=import-outside-toplevel
  tmp = tmp_path_factory.mktemp("serve")
  root = tmp / "photos"
  arrays = {
      "a/astronaut.jpg": data.astronaut()[::2, ::2], "a/coffee.jpg": data.coffee()[::2, ::2],
      "b/sub/chelsea.png": data.chelsea()[::2, ::2],
      "b/rocket.jpg": np.ascontiguousarray(np.rot90(data.rocket()))[::2, ::2],
      "c/camera.jpg": np.stack([data.camera()[::4, ::4]] * 3, -1),
      "c/coins.jpg": np.stack([data.coins()[::2, ::2]] * 3, -1),
  }
  for rel, a in arrays.items():
    os.makedirs(os.path.dirname(str(root / rel)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(str(root / rel))
  (root / "a" / "notes.txt").write_text("in the folder, not in the collection")
  (tmp / "secret.txt").write_text("outside the collection")
  Image.fromarray(data.chelsea()[::3, ::3]).save(str(tmp / "outside.jpg"))
  os.symlink(str(tmp / "outside.jpg"), str(root / "c" / "link.jpg"))  # leads out of the root
  # Described by a relative path (from the current folder): images.txt lists relative paths,
  # which results keep, as --mode=search's results.json does.
  config = _config(tmp, os.path.relpath(str(root)))
  workdir = str(tmp / "work")
  described = run.run("describe", config, workdir)
  assert described["images"] == len(PHOTOS) + 1  # the symlinked photo is described too
  server = app_lib.make_server(config, workdir)
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 60
  while not server.started:
    assert thread.is_alive() and time.time() < deadline, "the server did not start"
    time.sleep(0.05)
  host, port = server.servers[0].sockets[0].getsockname()[:2]
  yield dict(url=f"http://{host}:{port}", host=host, port=port, root=str(root), tmp=tmp,
             config=config, workdir=workdir, server=server)
  server.should_exit = True
  thread.join(timeout=30)


def _get(url):
  try:
    with urllib.request.urlopen(url, timeout=60) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _post(url, body, headers=None):
  request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=120) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _raw_get(served, path):
  """GET with the path sent as it is (urllib would not normalise it, but be explicit)."""
  conn = http.client.HTTPConnection(served["host"], served["port"], timeout=30)
  conn.putrequest("GET", path, skip_accept_encoding=True)
  conn.endheaders()
  response = conn.getresponse()
  return response.status, response.read()


def _photo(served, rel):
  with open(os.path.join(served["root"], rel), "rb") as f:
    return f.read()


def test_binds_localhost_and_reports_health(served):
  assert served["config"].serve.host == "127.0.0.1" and served["host"] == "127.0.0.1"
  status, body = _get(served["url"] + "/healthz")
  assert status == 200
  health = json.loads(body)
  assert health["images"] == len(PHOTOS) + 1 and health["backend"] == "exact"
  status, page = _get(served["url"] + "/")
  assert status == 200 and b"<script>" in page
  # Offline: nothing is fetched from another site.
  assert not any(s in page.lower() for s in (b'src="http', b"src='http", b'href="http',
                                             b"@import", b"//cdn"))


def test_search_answers_as_search_mode_does(served, tmp_path):
  query = os.path.join(os.path.relpath(served["root"]), "a", "coffee.jpg")
  status, got = _post(served["url"] + "/search?k=4", _photo(served, "a/coffee.jpg"))
  assert status == 200
  results = got["results"]
  assert [r["rank"] for r in results] == [1, 2, 3, 4]
  # --mode=search on the same query, same index: the same list.
  config = served["config"]
  with config.unlocked():
    config.search.query, config.search.out, config.search.k = query, str(tmp_path), 4
  try:
    run.run("search", config, served["workdir"])
  finally:
    with config.unlocked():
      config.search.query, config.search.out, config.search.k = "", "", 3
  with open(tmp_path / "results.json") as f:
    (want,) = json.load(f)
  assert [r["image"] for r in results] == [r["image"] for r in want["results"]]
  np.testing.assert_allclose([r["score"] for r in results],
                             [r["score"] for r in want["results"]], atol=1e-5)
  # And a numpy ranking of the stored descriptors around the query's own row.
  stored = descriptor_store.load_descriptors(os.path.join(served["workdir"], "describe"))
  db = np.asarray(stored["descriptors"], np.float64)
  row = stored["images"].index(query)
  order = np.argsort(-(db @ db[row]), kind="stable")[:4]
  assert [r["image"] for r in results] == [stored["images"][i] for i in order]
  assert results[0]["image"] == query and results[0]["score"] > 0.999
  assert results[0]["url"] == "/images/a/coffee.jpg"
  # Without ?k=, search.k results.
  status, got = _post(served["url"] + "/search", _photo(served, "b/rocket.jpg"))
  assert status == 200 and len(got["results"]) == served["config"].search.k


def test_queries_arriving_together_are_batched(served, monkeypatch):
  """Five requests: the first occupies the worker (held until the other four wait), the
  four waiting ones are then described and searched as one batch."""
  batcher = served["server"].config.app.state.batcher
  searcher = batcher.searcher
  names = ("a/astronaut.jpg", "b/rocket.jpg", "c/camera.jpg", "a/coffee.jpg", "c/coins.jpg")
  search, held = searcher.search, []

  def hold_the_first_batch(images, ks):
    if not held:
      held.append(len(images))
      deadline = time.time() + 60
      while batcher.waiting < len(names) - 1 and time.time() < deadline:
        time.sleep(0.01)
    return search(images, ks)

  monkeypatch.setattr(searcher, "search", hold_the_first_batch)
  before = len(batcher.batches)
  ask = lambda n: _post(served["url"] + "/search?k=2", _photo(served, n))
  with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
    # The first request alone reaches the worker before the others are sent (sent all at
    # once, two could arrive before the worker takes the first: a batch of 2, then 3).
    first = pool.submit(ask, names[0])
    deadline = time.time() + 60
    while not held and time.time() < deadline:
      time.sleep(0.01)
    answers = [first] + [pool.submit(ask, n) for n in names[1:]]
    answers = [a.result() for a in answers]
  for name, (status, got) in zip(names, answers):
    assert status == 200 and got["results"][0]["url"] == "/images/" + name
  assert batcher.batches[before:] == [1, len(names) - 1]


def _png_header(width, height):
  """A valid PNG signature + IHDR announcing width x height, and no pixel data."""
  def chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _noise_png(side):
  buf = io.BytesIO()
  noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
  Image.fromarray(noise).save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize("case", ["not_an_image", "empty", "bomb_header", "over_max_bytes",
                                  "truncated_jpeg", "bad_k"])
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(served, case):
  photo = _photo(served, "a/coffee.jpg")
  body, path = {
      "not_an_image": (b"%PDF-1.4 this is not a photo", "/search"),
      "empty": (b"", "/search"),
      "bomb_header": (_png_header(40000, 40000), "/search"),
      "over_max_bytes": (_noise_png(300), "/search"),
      "truncated_jpeg": (photo[:len(photo) // 3], "/search"),
      "bad_k": (photo, "/search?k=zero"),
  }[case]
  if case == "over_max_bytes":
    assert len(body) > MAX_BYTES
  status, got = _post(served["url"] + path, body)
  want = {"not_an_image": 415, "empty": 400, "bomb_header": 413, "over_max_bytes": 413,
          "truncated_jpeg": 422, "bad_k": 400}[case]
  assert status == want, got
  assert got["error"], got
  # Still serving: a good query right after.
  status, got = _post(served["url"] + "/search?k=1", photo)
  assert status == 200 and got["results"][0]["url"] == "/images/a/coffee.jpg"


def test_upload_over_max_bytes_is_refused_before_it_is_read(served):
  conn = http.client.HTTPConnection(served["host"], served["port"], timeout=30)
  conn.putrequest("POST", "/search")
  conn.putheader("Content-Length", str(10 * MAX_BYTES))
  conn.endheaders()
  conn.send(b"x" * 1000)  # most of the declared body never comes
  response = conn.getresponse()
  assert response.status == 413 and b"serve.max_bytes" in response.read()


def test_images_are_served_only_from_the_collection(served):
  status, body = _get(served["url"] + "/images/b/sub/chelsea.png")
  assert status == 200 and body == _photo(served, "b/sub/chelsea.png")
  for path in ("/images/../secret.txt", "/images/%2e%2e/secret.txt",
               "/images/a/%2e%2e/%2e%2e/secret.txt", "/images/a/notes.txt",
               "/images/c/link.jpg",  # described, but a symlink out of the root
               "/images//etc/passwd", "/images/%2Fetc%2Fpasswd", "/images/a/nothing.jpg"):
    status, body = _raw_get(served, path)
    assert status == 404, (path, status)
    assert b"outside the collection" not in body and b"root:" not in body
  status, listing = _get(served["url"] + "/collection?limit=3")
  listing = json.loads(listing)
  assert listing["total"] == len(PHOTOS) + 1
  assert [e["name"] for e in listing["images"]] == ["a/astronaut.jpg", "a/coffee.jpg",
                                                    "b/rocket.jpg"]


def _chromium():
  binary = shutil.which("chromium") or shutil.which("chromium-browser")
  if binary is None:
    if os.environ.get("CI") == "true":
      pytest.fail("CI needs Debian's chromium for the browser test (.ci/run installs it)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")
  return binary


def _browse(served, what, url, tmp_path):
  cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,760",
         "--virtual-time-budget=60000", *what, url]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def test_page_in_a_real_browser_searches_and_shows_thumbnails(served, tmp_path):
  """Chromium opens the page with ?query=a/coffee.jpg: the page fetches that collection
  image and POSTs its bytes as a dropped file would be; the DOM after the run shows the
  query's own image first, k figures with rank and score, every thumbnail decoded."""
  from html.parser import HTMLParser  # pylint: disable=import-outside-toplevel
  url = served["url"] + "/?query=a/coffee.jpg&k=4"
  dom = _browse(served, ["--dump-dom"], url, tmp_path)

  class Figures(HTMLParser):
    def __init__(self):
      super().__init__()
      self.body, self.figures, self.images, self._in_results = {}, [], [], False

    def handle_starttag(self, tag, attrs):
      attrs = dict(attrs)
      if tag == "body":
        self.body = attrs
      if tag == "div" and attrs.get("id") == "results":
        self._in_results = True
      if tag == "h2":  # the collection's heading ends the results
        self._in_results = False
      if self._in_results and tag == "figure":
        self.figures.append(attrs)
      if self._in_results and tag == "img":
        self.images.append(attrs)

  parsed = Figures()
  parsed.feed(dom)
  assert parsed.body.get("data-state") == "done", dom[-3000:]
  assert [f["data-rank"] for f in parsed.figures] == ["1", "2", "3", "4"]
  assert parsed.figures[0]["data-image"] == "a/coffee.jpg"
  assert float(parsed.figures[0]["data-score"]) > 0.999
  # Every result has a decoded thumbnail, except the symlink out of the root, which has none.
  served_names = [f["data-image"] for f in parsed.figures if f["data-image"] != "c/link.jpg"]
  assert [img["title"] for img in parsed.images] == served_names
  for img in parsed.images:
    assert img.get("data-loaded") == "true" and int(img["data-natural-width"]) > 0, img
  # The screenshot (README: docs/search_page.png, refreshed with RETRIEVAL_JAX_SCREENSHOT).
  png = tmp_path / "search_page.png"
  _browse(served, [f"--screenshot={png}"], url, tmp_path)
  shot = np.asarray(Image.open(png).convert("RGB")).astype(int)
  assert shot.shape[:2] == (760, 1000)
  assert shot.std() > 20  # thumbnails and text, not a blank page
  if os.environ.get("RETRIEVAL_JAX_SCREENSHOT"):
    shutil.copy(png, os.environ["RETRIEVAL_JAX_SCREENSHOT"])


def test_serve_settings_are_checked_before_anything_loads(tmp_path):
  from retrieval_jax import config_checks  # pylint: disable=import-outside-toplevel
  c = common.base_config()
  c.serve.port, c.serve.host, c.serve.max_bytes = 70000, "", 0
  with pytest.raises(config_checks.ConfigError) as e:
    run.run("serve", c, str(tmp_path))
  for key in ("serve.port=70000", "serve.host", "serve.max_bytes=0"):
    assert key in str(e.value)
  c = common.base_config()
  with pytest.raises(FileNotFoundError, match="run --mode=describe"):
    run.run("serve", c, str(tmp_path))


def test_faiss_backend_answers_as_the_exact_one(served):
  """search.backend=faiss: the index is built once beside the descriptors and loaded with
  the server; a flat (exact) faiss index returns the exact search's lists."""
  pytest.importorskip("faiss")
  from retrieval_jax.search_page import queries  # pylint: disable=import-outside-toplevel
  exact = served["server"].config.app.state.batcher.searcher
  folder = os.path.join(served["workdir"], "describe")
  approximate = queries.Searcher(exact.model, exact.variables, exact.mesh, exact.settings,
                                 descriptor_store.load_descriptors(folder), folder,
                                 backend="faiss", factory="Flat")
  assert os.path.exists(os.path.join(folder, "faiss_Flat.index"))
  photos = [_photo(served, n) for n in ("a/coffee.jpg", "c/camera.jpg")]
  want, got = exact.search(photos, [3, 2]), approximate.search(photos, [3, 2])
  for w, g in zip(want, got):
    assert [r["image"] for r in g] == [r["image"] for r in w]
    np.testing.assert_allclose([r["score"] for r in g], [r["score"] for r in w], atol=1e-5)
