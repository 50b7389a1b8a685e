"""The tf.data backend gives the grain backend's batches; TFDS builders read the raw layout.

TensorFlow and tensorflow-datasets come with the `tf` extra, which CI installs
(launch/setup_env.sh); elsewhere the module is skipped.
"""
import os
import pickle

import numpy as np
from PIL import Image
import pytest

tf = pytest.importorskip("tensorflow")

from retrieval_jax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
from retrieval_jax.data import image_io  # pylint: disable=g-import-not-at-top
from retrieval_jax.data import tfdata_pipeline  # pylint: disable=g-import-not-at-top


def _photo(h, w, seed):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _jpeg(path, h, w, seed, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_photo(h, w, seed)).save(path, format="JPEG", quality=90, **kw)
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tf"))
  paths, labels = [], []
  for c in range(6):
    for v in range(3):
      size = [(40, 56), (56, 40), (48, 48)][(c + v) % 3]
      paths.append(_jpeg(os.path.join(root, f"{c}_{v}.jpg"), *size, 10 * c + v))
      labels.append(c)
  paths[4] = os.path.join(root, "missing.jpg")  # Replaced by its landmark's next image.
  return paths, np.asarray(labels, np.int32)


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("kw", [
    dict(sampler="balanced"),
    dict(sampler="shuffle", batch_size=4, train_resize="long_side"),
    dict(sampler="balanced", process_index=1, process_count=2),
])
def test_grain_and_tfdata_give_the_same_batches(files, kw):
  common = dict(classes_per_batch=2, images_per_class=2, image_size=24, seed=3,
                num_steps=5, **kw)
  g = grain_pipeline.train_dataset(*files, **common)
  t = list(tfdata_pipeline.train_iterator(tfdata_pipeline.train_dataset(*files, **common)))
  assert len(t) == 5
  for step in range(5):
    _assert_same(t[step], g[step])
  resumed = tfdata_pipeline.train_dataset(*files, start_step=3, **common)
  for step, batch in enumerate(resumed.as_numpy_iterator(), start=3):
    _assert_same(batch, g[step])
  spec = tfdata_pipeline.train_dataset(*files, **common).element_spec
  assert spec["image"].shape == g[0]["image"].shape  # Static shapes for jit.


def test_eval_batches_match_grain_and_count_skips(files, tmp_path):
  paths = list(files[0])
  bad = str(tmp_path / "bad.jpg")
  with open(bad, "wb") as f:
    f.write(b"not an image")
  paths[7] = bad

  def collect(module):
    counter = image_io.SkipCounter()
    rows, shapes = {}, set()
    for batch in module.eval_batches(paths, long_side=32, batch_size=4, skipped=counter):
      assert batch["index"].dtype == np.int32 and batch["mask"].dtype == bool
      shapes.add(batch["image"].shape)
      for r, i in enumerate(batch["index"]):
        if i >= 0:
          rows[int(i)] = (batch["image"][r], batch["mask"][r])
        else:
          assert not batch["mask"][r].any() and not batch["image"][r].any()
    return rows, shapes, counter

  (g, g_shapes, g_count), (t, t_shapes, t_count) = (
      collect(grain_pipeline), collect(tfdata_pipeline))
  assert g_shapes == t_shapes and all(s[0] == 4 for s in t_shapes)
  assert sorted(t) == sorted(g) == [i for i in range(len(paths)) if i not in (4, 7)]
  for i in g:
    np.testing.assert_array_equal(t[i][0], g[i][0])
    np.testing.assert_array_equal(t[i][1], g[i][1])
  assert dict(t_count.counts) == dict(g_count.counts) == {"missing": 1, "unidentified": 1}


# ---------------------------------------------------------------------------------------
# TFDS builders over a miniature copy of the reference's file layout.


def _fake_sfm(root):
  base = os.path.join(root, "train", "retrieval-SfM-120k")
  db = {}
  for split, n in (("train", 6), ("val", 3)):
    cids = [f"{split}{i:04d}abcdef" for i in range(n)]
    for i, cid in enumerate(cids):
      _jpeg(os.path.join(base, "ims", cid[-2:], cid[-4:-2], cid[-6:-4], cid), 30, 40, i)
    db[split] = {"cids": cids, "cluster": [i // 2 for i in range(n)],
                 "qidxs": [0, 2], "pidxs": [1, 3 % n]}
  # A truncated file: left out of the records, counted.
  cid = db["train"]["cids"][5]
  path = os.path.join(base, "ims", cid[-2:], cid[-4:-2], cid[-6:-4], cid)
  _jpeg(path, 200, 200, 99)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with open(os.path.join(base, "retrieval-SfM-120k.pkl"), "wb") as f:
    pickle.dump(db, f)


def _fake_roxford(root):
  base = os.path.join(root, "test", "roxford5k")
  imlist = [f"all_souls_{i:06d}" for i in range(5)]
  exif = Image.Exif()
  exif[0x0112] = 6
  for i, name in enumerate(imlist):
    _jpeg(os.path.join(base, "jpg", name + ".jpg"), 36, 48, i,
          **({"exif": exif.tobytes()} if i == 1 else {}))
  gnd = [{"bbx": [2.0, 3.0, 30.0, 25.0], "easy": [1, 2], "hard": [3], "junk": [4]}]
  with open(os.path.join(base, "gnd_roxford5k.pkl"), "wb") as f:
    pickle.dump({"imlist": imlist, "qimlist": [imlist[0]], "gnd": gnd}, f)
  return [os.path.join(base, "jpg", n + ".jpg") for n in imlist]


def test_tfds_builders_keep_original_bytes_and_ground_truth(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from retrieval_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  root, data_dir = str(tmp_path / "raw"), str(tmp_path / "tfds")
  _fake_sfm(root)
  builder = tfds_builders.prepare("retrieval_sfm120k", manual_dir=root, data_dir=data_dir,
                                  file_format="tfrecord")  # as_dataset reads TFRecords
  train = list(builder.as_dataset(split="train", decoders=tfds_builders.RAW_IMAGE)
               .as_numpy_iterator())
  assert sorted(int(e["index"]) for e in train) == [0, 1, 2, 3, 4]  # 5 was truncated.
  assert builder.info.splits["val"].num_examples == 3
  assert builder.info.metadata["train"] == {"qidxs": [0, 2], "pidxs": [1, 3],
                                            "labels": [0, 0, 1, 1, 2, 2]}
  from retrieval_jax.data import datasets  # pylint: disable=g-import-not-at-top
  tset = datasets.get_dataset("retrieval-sfm-120k", root, "train")
  for e in train:
    i = int(e["index"])
    assert int(e["label"]) == tset.labels[i]
    with open(tset.images[i], "rb") as f:
      assert e["image"] == f.read()  # Stored untouched.

  paths = _fake_roxford(root)
  builder = tfds_builders.prepare("revisited_oxford_paris/roxford5k", manual_dir=root,
                                  data_dir=data_dir, file_format="tfrecord")
  (query,) = builder.as_dataset(split="query", decoders=tfds_builders.RAW_IMAGE)
  query = {k: v.numpy() for k, v in query.items()}
  np.testing.assert_array_equal(query["easy"], [1, 2])
  np.testing.assert_array_equal(query["junk"], [4])
  assert query["ok"].shape == (0,)
  np.testing.assert_array_equal(
      tfds_builders.decode_image(query["image"], bbx=query["bbx"]),
      image_io.load_rgb(paths[0], (2.0, 3.0, 30.0, 25.0)))
  db = {int(e["index"]): e for e in builder.as_dataset(
      split="db", decoders=tfds_builders.RAW_IMAGE).as_numpy_iterator()}
  assert sorted(db) == list(range(5))
  exif_rotated = tfds_builders.decode_image(db[1]["image"])
  assert exif_rotated.shape == (48, 36, 3)  # EXIF orientation applied, as image_io does.
  np.testing.assert_array_equal(exif_rotated, image_io.load_rgb(paths[1]))


@pytest.mark.parametrize("kw", [
    dict(sampler="balanced"),
    dict(sampler="shuffle", batch_size=4, train_resize="long_side"),
])
def test_tfds_backend_gives_the_grain_batches(tmp_path, kw):
  """data.backend=tfds: batches read from the prepared records == grain's from the files,
  including the replacement of the truncated file (left out of the records)."""
  pytest.importorskip("tensorflow_datasets")
  from retrieval_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  root, data_dir = str(tmp_path / "raw"), str(tmp_path / "tfds")
  _fake_sfm(root)
  builder = tfds_builders.prepare("retrieval_sfm120k", manual_dir=root, data_dir=data_dir)
  tset = datasets.get_dataset("retrieval-sfm-120k", root, "train")
  common = dict(classes_per_batch=2, images_per_class=2, image_size=24, seed=5,
                num_steps=6, **kw)
  g_skips, t_skips = image_io.SkipCounter(), image_io.SkipCounter()
  g = grain_pipeline.train_dataset(tset.images, tset.labels, skipped=g_skips, **common)
  t = tfds_builders.train_dataset(builder, "train", skipped=t_skips, **common)
  for step in range(6):
    _assert_same(t[step], g[step])
  assert g_skips.total > 0, "the plan never drew the truncated image: the test proves less"
  assert t_skips.total == g_skips.total == 1
  # Random access in any order gives the same element (grain may read steps out of order).
  _assert_same(t[3], g[3])


def test_config_data_backend_tfds_feeds_training_the_grain_batches(tmp_path):
  """`--config.data.backend=tfds`: the trainer's inputs (train/inputs.py) prepare the
  records under <workdir>/tfds once and yield what data.backend=grain yields."""
  pytest.importorskip("tensorflow_datasets")
  from configs import common  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from retrieval_jax.train import inputs  # pylint: disable=g-import-not-at-top
  root, workdir = str(tmp_path / "raw"), str(tmp_path / "work")
  _fake_sfm(root)
  config = common.base_config()
  config.data.name, config.data.root = "retrieval-sfm-120k", root
  config.data.classes_per_batch, config.data.images_per_class = 2, 2
  config.data.image_size, config.train.num_steps = 24, 4
  train_set = datasets.get_dataset("retrieval-sfm-120k", root, "train")
  got = {}
  for backend in ("grain", "tfds"):
    config.data.backend = backend
    feed = inputs.make_inputs(config, train_set, None, None, workdir)
    got[backend] = [feed.next_batch(step, None) for step in range(4)]
  assert os.path.isdir(os.path.join(workdir, "tfds", "retrieval_sfm120k"))
  for a, b in zip(got["grain"], got["tfds"]):
    _assert_same(a, b)
  config.data.name = "demo"
  with pytest.raises(ValueError, match="data.backend='tfds' has a builder for"):
    inputs.make_inputs(config, train_set, None, None, workdir)
