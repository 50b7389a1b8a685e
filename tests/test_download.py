"""Tests for download.py, transfer.py and archives.py against a local HTTP server on 127.0.0.1 (no other address)."""
import hashlib
import http.server
import io
import os
import tarfile
import threading
import zipfile

import pytest

from retrieval_jax.data import archives
from retrieval_jax.data import datasets
from retrieval_jax.data import download
from retrieval_jax.data import transfer


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves files of `server.root` with optional Range support and faults."""

  def log_message(self, *args):  # keep pytest output clean
    pass

  def do_GET(self):
    srv = self.server
    srv.requests.append((self.path, self.headers.get("Range")))
    path = os.path.join(srv.root, self.path.lstrip("/"))
    if not os.path.isfile(path):
      self.send_error(404)
      return
    with open(path, "rb") as f:
      data = f.read()
    start = 0
    rng = self.headers.get("Range")
    if rng and srv.honour_range:
      start = int(rng.split("=")[1].split("-")[0])
      if start >= len(data):
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(data)}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
      self.send_response(200)
    body = data[start:]
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if srv.drop_after is not None:
      # Announce the full length, send part of it, then hang up (a dropped connection).
      cut, srv.drop_after = srv.drop_after, None
      self.wfile.write(body[:cut])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
  root = tmp_path / "srv"
  root.mkdir()
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.root = str(root)
  httpd.requests = []
  httpd.honour_range = True
  httpd.drop_after = None
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
  try:
    yield httpd
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _payload(n=300_000):
  return bytes((i * 7 + i // 251) % 256 for i in range(n))


def _serve(server, name, data):
  with open(os.path.join(server.root, name), "wb") as f:
    f.write(data)
  return f"{server.url}/{name}"


def test_plain_download_and_checksum(server, tmp_path):
  data = _payload()
  url = _serve(server, "f.bin", data)
  dest = tmp_path / "out" / "f.bin"
  transfer.download_file(url, str(dest), sha256=hashlib.sha256(data).hexdigest(),
                         md5=hashlib.md5(data).hexdigest(), size=len(data), timeout=5)
  assert dest.read_bytes() == data
  assert not os.path.exists(str(dest) + ".part")
  # A second call finds the verified file and does not hit the server.
  n = len(server.requests)
  transfer.download_file(url, str(dest), sha256=hashlib.sha256(data).hexdigest(), timeout=5)
  assert len(server.requests) == n


def test_resume_from_partial_file(server, tmp_path):
  data = _payload()
  url = _serve(server, "f.bin", data)
  dest = tmp_path / "f.bin"
  part = tmp_path / "f.bin.part"
  part.write_bytes(data[:123_456])
  transfer.download_file(url, str(dest), sha256=hashlib.sha256(data).hexdigest(),
                         timeout=5)
  assert dest.read_bytes() == data
  assert server.requests[-1][1] == "bytes=123456-"
  assert not part.exists()


def test_resume_after_dropped_connection(server, tmp_path):
  data = _payload()
  url = _serve(server, "f.bin", data)
  server.drop_after = 100_000
  dest = tmp_path / "f.bin"
  transfer.download_file(url, str(dest), timeout=5, retry_wait=0.0)
  assert dest.read_bytes() == data
  ranges = [r for _, r in server.requests]
  assert ranges[0] is None and ranges[1] == "bytes=100000-"


def test_server_ignoring_range_restarts(server, tmp_path):
  data = _payload()
  url = _serve(server, "f.bin", data)
  server.honour_range = False
  (tmp_path / "f.bin.part").write_bytes(b"\x00" * 5000)  # garbage prefix
  dest = tmp_path / "f.bin"
  transfer.download_file(url, str(dest), md5=hashlib.md5(data).hexdigest(), timeout=5)
  assert dest.read_bytes() == data


def test_complete_part_file_with_416(server, tmp_path):
  data = _payload(10_000)
  url = _serve(server, "f.bin", data)
  (tmp_path / "f.bin.part").write_bytes(data)
  dest = tmp_path / "f.bin"
  transfer.download_file(url, str(dest), sha256=hashlib.sha256(data).hexdigest(),
                         timeout=5)
  assert dest.read_bytes() == data


def test_checksum_mismatch_raises_and_keeps_nothing(server, tmp_path):
  data = _payload()
  url = _serve(server, "f.bin", data)
  dest = tmp_path / "f.bin"
  with pytest.raises(transfer.ChecksumError):
    transfer.download_file(url, str(dest), sha256="0" * 64, timeout=5)
  assert not dest.exists()
  assert not (tmp_path / "f.bin.part").exists()
  with pytest.raises(transfer.ChecksumError):
    transfer.download_file(url, str(dest), size=len(data) + 1, timeout=5)
  assert not dest.exists() and not (tmp_path / "f.bin.part").exists()


def test_missing_url_is_clear_error(server, tmp_path):
  with pytest.raises(transfer.DownloadError, match="404"):
    transfer.download_file(f"{server.url}/nope.bin", str(tmp_path / "x"), timeout=5)
  assert not (tmp_path / "x").exists()


def _make_tgz(files):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for name, content in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return buf.getvalue()


def _make_zip(files):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    for name, content in files.items():
      zf.writestr(name, content)
  return buf.getvalue()


def test_extract_tgz_and_zip(tmp_path):
  tgz = tmp_path / "a.tgz"
  tgz.write_bytes(_make_tgz({"top/sub/x.jpg": b"x", "top/y.jpg": b"yy"}))
  out = tmp_path / "out"
  archives.extract_archive(str(tgz), str(out))
  assert (out / "top" / "sub" / "x.jpg").read_bytes() == b"x"
  flat = tmp_path / "flat"
  archives.extract_archive(str(tgz), str(flat), flatten=True)
  assert sorted(os.listdir(flat)) == ["x.jpg", "y.jpg"]
  zp = tmp_path / "b.zip"
  zp.write_bytes(_make_zip({"full/ukbench00000.jpg": b"z", "top/sub/q.jpg": b"q"}))
  archives.extract_archive(str(zp), str(out))
  assert (out / "full" / "ukbench00000.jpg").read_bytes() == b"z"
  assert (out / "top" / "sub" / "x.jpg").exists()  # merged with the earlier tree
  assert (out / "top" / "sub" / "q.jpg").exists()
  assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


@pytest.mark.parametrize("bad", ["../evil.txt", "/abs/evil.txt"])
def test_extract_rejects_path_traversal(tmp_path, bad):
  tgz = tmp_path / "bad.tgz"
  tgz.write_bytes(_make_tgz({bad: b"evil"}))
  with pytest.raises(ValueError, match="unsafe"):
    archives.extract_archive(str(tgz), str(tmp_path / "out"))
  assert not (tmp_path / "evil.txt").exists()


def test_dataset_download_end_to_end(server, tmp_path, monkeypatch):
  """A roxford5k-shaped plan served locally: archive flattened, gnd fetched, linked,
  and the result read by the loader."""
  tgz = _make_tgz({"oxbuild/all_souls_000001.jpg": b"1", "oxbuild/x/q_1.jpg": b"2"})
  gnd = io.BytesIO()
  import pickle  # pylint: disable=g-import-not-at-top
  pickle.dump({"imlist": ["all_souls_000001"], "qimlist": ["q_1"],
               "gnd": [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [], "junk": []}]}, gnd)
  _serve(server, "oxbuild_images-v1.tgz", tgz)
  _serve(server, "gnd_roxford5k.pkl", gnd.getvalue())
  monkeypatch.setattr(download, "OXFORD_URL", server.url)
  monkeypatch.setattr(download, "CIRTORCH_URL", server.url)
  original_gnd = download._gnd
  monkeypatch.setattr(download, "_gnd", lambda name: download.Resource(
      url=f"{server.url}/gnd_{name}.pkl", dest=original_gnd(name).dest))
  root = tmp_path / "data"
  assert download.main(["roxford5k", "--dir", str(root)]) == 0
  jpg = root / "test" / "oxford5k" / "jpg"
  assert sorted(os.listdir(jpg)) == [".extracted-oxbuild_images-v1.tgz",
                                     "all_souls_000001.jpg", "q_1.jpg"]
  assert not (root / "test" / "oxford5k" / "oxbuild_images-v1.tgz").exists()
  assert os.path.islink(root / "test" / "roxford5k" / "jpg")
  rs = datasets.get_dataset("roxford5k", str(root))
  assert os.path.exists(rs.query_images[0]) and os.path.exists(rs.db_images[0])
  # Rerun: everything is marked done, nothing is downloaded again.
  n = len(server.requests)
  download.main(["roxford5k", "--dir", str(root)])
  assert len(server.requests) == n


def test_gldv2_md5_file_checked(server, tmp_path, monkeypatch):
  tar = _make_tgz({"0/1/2/0123456789abcdef.jpg": b"img"})
  os.makedirs(os.path.join(server.root, "test"))
  os.makedirs(os.path.join(server.root, "md5sum", "test"))
  _serve(server, "test/images_000.tar", tar)
  _serve(server, "md5sum/test/md5.images_000.txt",
         f"{hashlib.md5(tar).hexdigest()}  images_000.tar\n".encode())
  monkeypatch.setattr(download, "GLDV2_URL", server.url)
  root = tmp_path / "data"
  download.download("gldv2", str(root), splits=["test"], max_archives=1)
  assert (root / "gldv2" / "test" / "0" / "1" / "2" / "0123456789abcdef.jpg").exists()
  # A wrong published MD5 is refused.
  _serve(server, "md5sum/test/md5.images_000.txt", b"0" * 32 + b"  images_000.tar\n")
  with pytest.raises(transfer.ChecksumError):
    download.download("gldv2", str(tmp_path / "data2"), splits=["test"], max_archives=1)


def test_plans_use_reference_urls(capsys, tmp_path):
  p = download.plan("retrieval-sfm-120k")
  urls = [r.url for r in p.resources]
  assert "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/ims.tar.gz" in urls
  assert ("http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/dbs/"
          "retrieval-SfM-120k.pkl") in urls
  assert ("train/retrieval-SfM-30k/ims", "../retrieval-SfM-120k/ims") in p.symlinks
  assert len(download.plan("revisitop1m").resources) == 101
  assert len(download.plan("gldv2", splits=["index"]).resources) == 100
  download.main(["rparis6k", "--dir", str(tmp_path), "--dry-run"])
  out = capsys.readouterr().out
  assert "http://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz" in out
  assert "gnd_rparis6k.pkl" in out and "server byte count only" in out
  assert not os.listdir(tmp_path)  # dry run writes nothing
  with pytest.raises(SystemExit):
    download.main(["not-a-dataset", "--dir", str(tmp_path)])
