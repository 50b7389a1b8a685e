"""Tests for the grain input pipelines: sharding, determinism, exact resume, bad files."""
import logging as std_logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from retrieval_jax import checkpointing
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import image_io
from retrieval_jax.data import protocol
from retrieval_jax.data import transforms

import cirtorch_reference  # pylint: disable=g-bad-import-order


def _photo(h, w, seed):
  """A smooth random image (JPEG-friendly, unlike white noise)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
  """12 landmarks x 4 JPEGs of varied sizes and aspect ratios."""
  root = tmp_path_factory.mktemp("train")
  paths, labels = [], []
  for c in range(12):
    for v in range(4):
      h, w = (48 + 8 * ((c + v) % 4), 64 + 12 * (v % 3))[::1 if (c + v) % 2 else -1]
      p = os.path.join(root, f"{c:02d}_{v}.jpg")
      Image.fromarray(_photo(h, w, 100 * c + v)).save(p, quality=90)
      paths.append(p)
      labels.append(c)
  return paths, np.asarray(labels, np.int32)


def _ds(files, **kw):
  args = dict(classes_per_batch=4, images_per_class=2, image_size=32, seed=0, num_steps=6)
  args.update(kw)
  return grain_pipeline.train_dataset(*files, **args)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sampler", ["balanced", "shuffle"])
def test_process_shards_are_disjoint_and_cover_the_global_batch(train_files, sampler):
  full = grain_pipeline.make_train_batch_fn(
      *train_files, classes_per_batch=4, images_per_class=2, image_size=32, seed=0,
      num_steps=6, sampler=sampler)
  shards = [grain_pipeline.make_train_batch_fn(
      *train_files, classes_per_batch=4, images_per_class=2, image_size=32, seed=0,
      num_steps=6, sampler=sampler, process_index=p, process_count=2) for p in range(2)]
  for step in range(3):
    rows = [s.global_rows(step) for s in shards]
    assert len(rows[0]) == len(rows[1]) == 4
    np.testing.assert_array_equal(np.concatenate(rows), full.global_rows(step))
    whole, parts = full(step), [s(step) for s in shards]
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  if sampler == "shuffle":  # Positions in the epoch order are disjoint across processes.
    assert not set(shards[0].global_rows(0)) & set(shards[1].global_rows(0))
  with pytest.raises(ValueError, match="divisible"):
    _ds(train_files, process_count=3)


@pytest.mark.parametrize("sampler", ["balanced", "shuffle"])
def test_same_seed_same_batches_other_seed_other_batches(train_files, sampler):
  a, b, c = (_ds(train_files, seed=s, sampler=sampler) for s in (5, 5, 6))
  for step in range(3):
    assert _equal(a[step], b[step])
  assert not any(_equal(a[s], c[s]) for s in range(3))
  assert not _equal(a[0], a[1])


def test_balanced_batches_group_landmarks(train_files):
  ds = _ds(train_files, classes_per_batch=3, images_per_class=4)
  for batch in (ds[0], ds[5]):
    labels = batch["label"].reshape(3, 4)
    assert (labels == labels[:, :1]).all() and len(set(labels[:, 0])) == 3


def test_static_shapes_and_dtypes(train_files):
  for resize in ("crop", "long_side"):
    ds = _ds(train_files, train_resize=resize, num_steps=4)
    batches = list(ds)
    assert len(batches) == 4
    for b in batches:
      assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
      assert b["label"].shape == (8,) and b["label"].dtype == np.int32
      if resize == "long_side":
        assert b["mask"].shape == (8, 32, 32) and b["mask"].dtype == bool
      else:
        assert "mask" not in b


def test_shuffle_sampler_visits_every_image_once_per_epoch(train_files):
  paths, labels = train_files
  labels = labels.copy()
  labels[:4] = -1  # Unlabelled images are never drawn.
  n = len(paths) - 4  # 44 labelled images.
  fn = grain_pipeline.make_train_batch_fn(paths, labels, batch_size=11, image_size=16,
                                          seed=1, num_steps=8, sampler="shuffle")
  epochs = [np.concatenate([fn.global_rows(s) for s in range(e * 4, e * 4 + 4)])
            for e in range(2)]
  for e in epochs:
    assert len(e) == n and sorted(e) == list(range(4, len(paths)))
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled each epoch.
  again = grain_pipeline.make_train_batch_fn(paths, labels, batch_size=11, image_size=16,
                                             seed=1, num_steps=8, sampler="shuffle")
  np.testing.assert_array_equal(again.global_rows(5), fn.global_rows(5))


def test_balanced_plan_skips_negative_labels():
  labels = np.asarray([-1] * 10 + [0, 0, 1, 1, 2, 2])
  plan = grain_pipeline.BalancedBatchPlan(labels, 3, 2, seed=0)
  for step in range(10):
    assert (labels[plan.indices(step)] >= 0).all()
  with pytest.raises(ValueError, match="landmarks"):
    grain_pipeline.BalancedBatchPlan(labels, 4, 2, seed=0)


def test_long_side_resize_pads_with_an_exact_mask(train_files):
  paths, labels = train_files
  fn = grain_pipeline.make_train_batch_fn(paths, labels, classes_per_batch=4,
                                          images_per_class=2, image_size=40, seed=0,
                                          num_steps=1, train_resize="long_side", flip=False)
  batch = fn(0)
  for r, i in enumerate(fn.global_rows(0)):
    # Written here with PIL: the long side shrunk to 40 (bilinear, rounded sizes, never
    # enlarged), then zero-padded at the bottom/right into 40 x 40.
    im = Image.open(paths[i]).convert("RGB")
    scale = 40 / max(im.size)
    if scale < 1:
      im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    want = np.zeros((40, 40, 3), np.uint8)
    want[:im.height, :im.width] = np.asarray(im)
    want_mask = np.zeros((40, 40), bool)
    want_mask[:im.height, :im.width] = True
    np.testing.assert_array_equal(batch["image"][r], want)
    np.testing.assert_array_equal(batch["mask"][r], want_mask)
    h, w = want_mask.sum(0).max(), want_mask.sum(1).max()
    assert max(h, w) == 40 and want_mask[:h, :w].all() and want_mask.sum() == h * w
    assert (batch["image"][r][~want_mask] == 0).all()


def test_small_images_are_not_enlarged_by_long_side():
  image = np.full((10, 20, 3), 7, np.uint8)
  padded, mask = transforms.resize_pad_square(image, 32)
  assert mask.sum() == 200 and mask[:10, :20].all()
  padded, mask = transforms.resize_pad_square(image, 32, upscale=True)
  assert mask.sum() == 16 * 32


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_from_iterator_state_is_exact(train_files, threads):
  ds = _ds(train_files, num_steps=7)
  it = grain_pipeline.train_iterator(ds, num_threads=threads, prefetch=3)
  uninterrupted = [next(it) for _ in range(7)]
  it = grain_pipeline.train_iterator(ds, num_threads=threads, prefetch=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = grain_pipeline.train_iterator(_ds(train_files, num_steps=7), num_threads=threads)
  resumed.set_state(state)
  rest = list(resumed)
  assert len(rest) == 4
  for a, b in zip(rest, uninterrupted[3:]):
    assert _equal(a, b)


def test_resume_through_orbax_checkpoint_is_exact(train_files, tmp_path):
  ds = _ds(train_files, num_steps=6)
  uninterrupted = list(grain_pipeline.train_iterator(ds))
  state = {"w": jnp.arange(3.0)}
  mgr = checkpointing.manager(str(tmp_path))
  it = grain_pipeline.train_iterator(ds)
  for _ in range(2):
    next(it)
  checkpointing.save(mgr, 2, state, it)
  next(it)  # The iterator moves on after the save; the checkpoint must not.
  mgr.wait_until_finished()
  fresh = grain_pipeline.train_iterator(_ds(train_files, num_steps=6))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored, step = checkpointing.restore(checkpointing.manager(str(tmp_path)), abstract,
                                         fresh)
  assert step == 2
  np.testing.assert_array_equal(restored["w"], state["w"])
  rest = list(fresh)
  assert len(rest) == 4
  for a, b in zip(rest, uninterrupted[2:]):
    assert _equal(a, b)


# ---------------------------------------------------------------------------------------
# Evaluation batches.


def _eval_files(root, n=11):
  paths = []
  for i in range(n):
    h, w = [(30, 50), (50, 30), (40, 40), (20, 90), (64, 48)][i % 5]
    p = os.path.join(root, f"e{i}.png")
    Image.fromarray(_photo(h, w, i)).save(p)
    paths.append(p)
  return paths


def test_eval_batches_equal_one_image_at_a_time(tmp_path):
  """Each row is cirtorch's input (tests/cirtorch_reference.py: PIL thumbnail to 48, LANCZOS),
  zero-padded at the bottom/right into the smallest of the three 48 px buckets."""
  paths = _eval_files(str(tmp_path))
  buckets = ((36, 48), (48, 36), (48, 48))  # landscape, portrait, square: ceil(0.75 * 48)
  assert transforms.square_buckets(48) == buckets
  seen = []
  for batch in grain_pipeline.eval_batches(paths, long_side=48, batch_size=3):
    n, h, w = batch["mask"].shape
    assert n == 3 and (h, w) in buckets
    assert batch["image"].shape == (3, h, w, 3) and batch["index"].dtype == np.int32
    for r, i in enumerate(batch["index"]):
      if i < 0:  # Padding rows are empty.
        assert not batch["mask"][r].any() and not batch["image"][r].any()
        continue
      im = np.asarray(cirtorch_reference.images_from_list_item(paths[i], 48))
      bucket = next(b for b in buckets if im.shape[0] <= b[0] and im.shape[1] <= b[1])
      assert bucket == (h, w)
      want = np.zeros((h, w, 3), np.uint8)
      want[:im.shape[0], :im.shape[1]] = im
      want_mask = np.zeros((h, w), bool)
      want_mask[:im.shape[0], :im.shape[1]] = True
      np.testing.assert_array_equal(batch["image"][r], want)
      np.testing.assert_array_equal(batch["mask"][r], want_mask)
      assert not batch["image"][r][~want_mask].any()
      seen.append(int(i))
  assert sorted(seen) == list(range(len(paths)))


def test_bucket_assignment():
  buckets = transforms.square_buckets(100)  # (75, 100), (100, 75), (100, 100)
  assert transforms.pick_bucket(50, 100, buckets) == 0
  assert transforms.pick_bucket(100, 60, buckets) == 1
  assert transforms.pick_bucket(80, 100, buckets) == 2
  assert transforms.pick_bucket(100, 100, buckets) == 2
  with pytest.raises(ValueError):
    transforms.pick_bucket(101, 10, buckets)


def test_eval_rotations_and_bboxes(tmp_path):
  paths = _eval_files(str(tmp_path), 3)
  bboxes = [None, (5, 5, 25, 45), None]
  out = {}
  for batch in grain_pipeline.eval_batches(paths, long_side=40, batch_size=2, bboxes=bboxes,
                                           rotations=[0, 0, 90]):
    for r, i in enumerate(batch["index"]):
      if i >= 0:
        out[int(i)] = batch["image"][r][batch["mask"][r].any(1)][:, batch["mask"][r].any(0)]
  # cirtorch's ImagesFromList item (the crop resized by 40 * its long side / the whole
  # image's), written in tests/cirtorch_reference.py; the rotation (clockwise) by PIL first.
  np.testing.assert_array_equal(out[0], cirtorch_reference.images_from_list_item(paths[0], 40))
  np.testing.assert_array_equal(out[1], cirtorch_reference.images_from_list_item(
      paths[1], 40, bboxes[1]))
  rotated = Image.open(paths[2]).convert("RGB").transpose(Image.ROTATE_270)
  np.testing.assert_array_equal(out[2], cirtorch_reference.imresize(rotated, 40))


# ---------------------------------------------------------------------------------------
# Awkward and broken files through the pipelines.


def _awkward_files(root):
  """{name: path}; the names starting with 'bad' cannot be read."""
  rgb = _photo(48, 64, 0)
  files = {}

  def save(name, image, **kw):
    files[name] = os.path.join(root, name)
    image.save(files[name], **kw)

  save("plain.jpg", Image.fromarray(rgb), quality=90)
  save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
  save("gray.jpg", Image.fromarray(rgb[..., 0]), quality=90)
  save("gray16.png", Image.fromarray(rgb[..., 1].astype(np.uint16) * 257))
  save("palette.png", Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE))
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotated: the stored 64 x 48 image is shown as 48 x 64.
  save("exif6.jpg", Image.fromarray(rgb), quality=90, exif=exif.tobytes())
  save("one_pixel.png", Image.fromarray(rgb[:1, :1]))
  save("wide20000.jpg", Image.fromarray(_photo(24, 20000, 3)), quality=80)
  trunc = os.path.join(root, "bad_truncated.jpg")
  Image.fromarray(_photo(256, 256, 4)).save(trunc, quality=95)
  with open(trunc, "r+b") as f:
    f.truncate(os.path.getsize(trunc) // 2)
  files["bad_truncated.jpg"] = trunc
  garbage = os.path.join(root, "bad_garbage.jpg")
  with open(garbage, "wb") as f:
    f.write(b"\xff\xd8\xff not a jpeg" * 20)
  files["bad_garbage.jpg"] = garbage
  files["bad_missing.jpg"] = os.path.join(root, "bad_missing.jpg")
  return files


def test_awkward_files_decode_or_are_skipped_and_counted(tmp_path, caplog):
  files = _awkward_files(str(tmp_path))
  names = sorted(files)  # The bad files first: a skip must not shift later indices.
  paths = [files[n] for n in names]
  counter = image_io.SkipCounter()
  got = {}
  user_folder = protocol.EvalProtocol(exif_transpose=True)
  with caplog.at_level(std_logging.WARNING):
    for batch in grain_pipeline.eval_batches(paths, long_side=64, batch_size=4,
                                             skipped=counter, protocol=user_folder):
      for r, i in enumerate(batch["index"]):
        if i >= 0:
          got[names[i]] = (batch["image"][r], batch["mask"][r])
  good = [n for n in names if not n.startswith("bad")]
  assert sorted(got) == sorted(good)
  assert counter.total == 3
  assert dict(counter.counts) == {"truncated": 1, "unidentified": 1, "missing": 1}
  assert "could not be read" in caplog.text and "bad_missing.jpg" in caplog.text
  buckets = transforms.square_buckets(64)
  for n in good:
    want = user_folder.resize(image_io.load_rgb(files[n]), 64)
    b = transforms.pick_bucket(want.shape[0], want.shape[1], buckets)
    want, want_mask = transforms.pad_to(want, buckets[b])
    np.testing.assert_array_equal(got[n][0], want)
    np.testing.assert_array_equal(got[n][1], want_mask)
  assert got["exif6.jpg"][1].any(0).sum() == 48  # Portrait after the EXIF rotation.
  assert got["one_pixel.png"][1].sum() == 1  # Never enlarged.
  assert got["wide20000.jpg"][1].any(1).sum() == 1  # 24 * 64 / 20000 rounds to 1 row.
  cmyk, plain = (got[n][0].astype(int) for n in ("cmyk.jpg", "plain.jpg"))
  assert np.abs(cmyk - plain).mean() < 8  # Colours kept, not inverted.


def test_training_replaces_unreadable_images_and_counts_them(tmp_path):
  files = _awkward_files(str(tmp_path))
  paths = list(files.values())
  bad = [i for i, n in enumerate(files) if n.startswith("bad")]
  # Landmark 0: the three bad files + plain.jpg; the others: two good images each.
  labels = np.asarray([0 if (n.startswith("bad") or n == "plain.jpg") else 1 + i // 2
                       for i, n in enumerate(files)], np.int32)
  for sampler in ("balanced", "shuffle"):
    counter = image_io.SkipCounter()
    fn = grain_pipeline.make_train_batch_fn(
        paths, labels, classes_per_batch=4, images_per_class=3, batch_size=6,
        image_size=24, seed=0, num_steps=30, sampler=sampler, skipped=counter)
    for step in range(8):
      batch = fn(step)
      assert batch["image"].shape == (fn.local_batch, 24, 24, 3)
      want = labels[fn.global_rows(step)]
      np.testing.assert_array_equal(batch["label"], want)  # Replaced within the landmark.
    assert counter.total == len(bad)  # Each bad file is counted once, then remembered.


def test_tfdata_module_imports_without_tensorflow():
  """TensorFlow is optional: the module imports, and its functions say what to install."""
  code = ("import sys; sys.modules['tensorflow'] = None\n"
          "from retrieval_jax.data import tfdata_pipeline as t\n"
          "try:\n"
          "  t.train_dataset(['a'], [0], image_size=8, seed=0, num_steps=1)\n"
          "except ImportError as e:\n"
          "  print('ImportError:', e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "pip install tensorflow-cpu" in out.stdout
