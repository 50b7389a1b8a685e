"""The odd-image set through every mode: unreadable files skipped and named, never a crash.

`odd_images.write` makes truncated, zero-byte, text-named-.jpg, decompression-bomb (a PNG
header claiming 40000 x 40000) and missing files beside CMYK, 16-bit, palette with
transparency, RGBA, EXIF-rotated, 1 x 1, 6000 x 2, 12000 x 9000 and PNG-named-.jpg images.
Each mode runs once, in this process, on a tiny random network (one compile shared): the
header check, training batches, extraction, evaluation with `eval.allow_missing=True`,
describe, search (the images as queries) and local-feature extraction. The unreadable files
must be named in the log and in the mode's skipped list; every other image gives a finite
descriptor.
"""
import logging as std_logging
import os

import jax
import numpy as np
import pytest

from configs import demo as demo_config
from retrieval_jax import describe
from retrieval_jax import errors
from retrieval_jax import descriptor_settings
from retrieval_jax import extract
from retrieval_jax import index_search as folder_search
from retrieval_jax import sharding
from retrieval_jax.evaluation import pipeline
from retrieval_jax.evaluation import rerankers
from retrieval_jax.evaluation import test_set
from retrieval_jax.data import datasets
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import image_io
from retrieval_jax.data import integrity
from retrieval_jax.local import extract as local_extract
from retrieval_jax.local import model as local_model
import odd_images
import tiny_models

LONG_SIDE = 64


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("odd"))
  paths = odd_images.write(folder)
  return folder, paths


@pytest.fixture(scope="module")
def net():
  model = tiny_models.tiny_resnet("gem")
  variables = tiny_models.random_variables(model, image_size=32)
  mesh = sharding.make_mesh(devices=jax.devices()[:min(8, jax.device_count())])
  return dict(model=model, variables=variables, mesh=mesh,
              describe_fn=extract.make_describe_fn(model, mesh))


def _names(paths):
  return sorted(os.path.basename(p) for p in paths)


def _all(paths):
  return [paths[n] for n in sorted(paths)]


def test_header_check_names_each_unreadable_file_and_never_raises(odd):
  _, paths = odd
  found = dict((os.path.basename(_all(paths)[i]), r)
               for i, r in integrity.find_problems(_all(paths)))
  # The truncated JPEG has a valid header: the decoder finds it (next tests).
  assert found == {"bomb.png": "too_large", "missing.jpg": "missing", "text.jpg": "unidentified",
                   "zero_byte.jpg": "empty"}


def test_decoder_skips_exactly_the_unreadable_ones(odd):
  _, paths = odd
  counter = image_io.SkipCounter()
  loaded = {n: image_io.try_load(p, counter=counter) for n, p in paths.items()}
  assert sorted(n for n, a in loaded.items() if a is None) == sorted(odd_images.UNREADABLE)
  assert _names(p for p, _ in counter.entries) == sorted(odd_images.UNREADABLE)
  for n, a in loaded.items():
    assert a is None or (a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3), n
  assert loaded["exif_rotated.jpg"].shape[:2] == (60, 30)  # turned upright


def test_training_drops_the_unreadable_images_and_batches_stay_finite(odd):
  _, paths = odd
  images = _all(paths)
  labels = np.arange(len(images)) // 2  # pairs of images as landmarks
  train_set = datasets.TrainSet("odd", images, labels.astype(np.int32))
  cleaned = integrity.drop_unreadable_train(train_set, min_landmarks=2)
  assert _names(p for p, _ in cleaned.skipped) == sorted(
      set(odd_images.UNREADABLE) - {"truncated.jpg"})  # found by the header check
  counter = image_io.SkipCounter()
  fn = grain_pipeline.make_train_batch_fn(
      cleaned.train_set.images, cleaned.train_set.labels, classes_per_batch=2,
      images_per_class=2, image_size=32, seed=0, num_steps=8, skipped=counter)
  for step in range(8):
    batch = fn(step)
    assert batch["image"].shape == (4, 32, 32, 3)
  # The truncated file, met while decoding, is counted by name (if it was drawn).
  assert set(_names(p for p, _ in counter.entries)) <= {"truncated.jpg"}


def test_extraction_evaluation_describe_search_and_local_features(odd, net, tmp_path, caplog):
  folder, paths = odd
  images = _all(paths)
  bad = [paths[n] for n in odd_images.UNREADABLE]
  kw = dict(mesh=net["mesh"], long_side=LONG_SIDE, describe_fn=net["describe_fn"])

  # extract: zero rows exactly for the unreadable files, named in the skip list.
  counter = image_io.SkipCounter()
  with caplog.at_level(std_logging.WARNING):
    x = extract.extract_descriptors(net["model"], net["variables"], images, skipped=counter,
                                    **kw)
  zero = [images[i] for i in np.flatnonzero(~np.any(x != 0, axis=1))]
  assert _names(zero) == sorted(odd_images.UNREADABLE)
  assert _names(p for p, _ in counter.entries) == sorted(odd_images.UNREADABLE)
  good = np.any(x != 0, axis=1)
  assert np.isfinite(x).all()
  np.testing.assert_allclose(np.linalg.norm(x[good], axis=1), 1.0, atol=1e-4)
  assert "bomb.png" in caplog.text

  # evaluate, eval.allow_missing=True: the unreadable ones left out and listed.
  c = demo_config.get_config()
  c.extract.long_side = LONG_SIDE
  c.extract.batch_size = 8
  labels = np.arange(len(images)) % 3
  rset = datasets.RetrievalSet("odd", query_images=images[:6], db_images=images,
                               query_labels=labels[:6], db_labels=labels)
  workdir = str(tmp_path / "eval")
  settings = descriptor_settings.build(c, net["model"], net["variables"], rset.name)
  context = rerankers.Context(c, workdir, "eval", net["model"], net["variables"], net["mesh"],
                              settings, test_set.check(rset, allow_missing=True))
  result = pipeline.evaluate(context, pipeline.Stages())
  assert np.isfinite(result["mAP"])
  n_bad_q = len(set(bad) & set(images[:6]))
  assert result["missing_queries"] == n_bad_q and result["missing_db_images"] == len(bad)
  with open(os.path.join(workdir, "results", "odd_skipped.txt")) as f:
    listed = [line.split("\t")[1] for line in f.read().splitlines()[1:]]
  assert _names(set(listed)) == sorted(odd_images.UNREADABLE)

  # describe (a list file, so that the missing one is listed too): skipped.txt names them.
  listing = tmp_path / "list.txt"
  listing.write_text("".join(f"{p}\n" for p in images))
  out = str(tmp_path / "index")
  got = describe.describe_images(net["model"], net["variables"], str(listing), out, chunk=4,
                                 **kw)
  assert _names(got["skipped"]) == sorted(odd_images.UNREADABLE)
  with open(os.path.join(out, describe.SKIPPED_FILE)) as f:
    assert _names(f.read().split()) == sorted(odd_images.UNREADABLE)
  assert np.isfinite(np.asarray(got["descriptors"])).all()
  assert len(got["images"]) == len(images) - len(bad)

  # search with the odd images as queries: the readable ones searched, the others listed.
  found = folder_search.search_folder(net["model"], net["variables"], out, str(listing),
                                      str(tmp_path / "search"), k=3, pictures_max=2, **kw)
  assert len(found["results"]) == len(images) - len(bad)
  with open(tmp_path / "search" / folder_search.SKIPPED_FILE) as f:
    listed = [line.split("\t")[1] for line in f.read().splitlines()[1:]]
  assert _names(listed) == sorted(odd_images.UNREADABLE)
  for query in ("text.jpg", "bomb.png"):  # a query that is not an image: a user error
    with pytest.raises(folder_search.QueryError, match="none of the 1 query images") as err:
      folder_search.search_folder(net["model"], net["variables"], out, paths[query],
                                  str(tmp_path / "search1"), k=3, **kw)
    assert errors.is_user_error(err.value)

  # local features: no crash, no keypoints for the unreadable ones, finite for the others.
  delf = local_model.DelfNet(backbone="resnet18", backbone_kwargs=tiny_models.TINY_KWARGS,
                             reduced_dim=8, attention_hidden=8)
  dvars = jax.jit(delf.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.uint8))
  store = local_extract.extract_to_store(
      delf, dvars, images, str(tmp_path / "local"), backbone="resnet18",
      backbone_kwargs=tiny_models.TINY_KWARGS, mesh=net["mesh"], long_side=LONG_SIDE,
      scales=(1.0,), score_threshold=-1.0, max_features=8, batch_size=8)
  for i, p in enumerate(images):
    rec = store[i]
    assert np.isfinite(rec["descriptors"]).all()
    assert (len(rec["scores"]) == 0) == (p in bad), p
