"""gs:// paths against a real Cloud Storage API server (gcp-storage-emulator, tests/gcs_emulator.py).

No mock: the objects go over HTTP into the emulator, through the proxy that adds the
`x-goog-generation` header tensorstore needs (see tests/gcs_emulator.py for why).
"""
import os
import subprocess

import fsspec
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import gpath as epath_gpath

from retrieval_jax import descriptor_store
from retrieval_jax import storage
from retrieval_jax.data import demo

import gcs_emulator
import multiprocess_util as mp


@pytest.fixture(scope="module")
def gcs_url():
  with gcs_emulator.running("bucket") as url:
    yield url


@pytest.fixture
def gcs_env(gcs_url, monkeypatch, tmp_path):
  """This process talks to the emulator; cwd is a scratch folder (to see stray `gs:` dirs)."""
  for k, v in gcs_emulator.environment(gcs_url).items():
    monkeypatch.setenv(k, v)
  monkeypatch.chdir(tmp_path)
  # Both read the environment once: gcsfs when a filesystem is created, etils when it first
  # decides whether gs:// goes through tensorflow (cached for the process).
  fsspec.filesystem("gs").clear_instance_cache()
  epath_gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  yield gcs_url
  fsspec.filesystem("gs").clear_instance_cache()
  epath_gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def test_orbax_checkpoint_round_trip_through_the_emulator(gcs_env, tmp_path):
  state = {"w": jnp.arange(12.0).reshape(3, 4), "b": {"p": jnp.full((2,), 3.0)}}
  directory = "gs://bucket/orbax_proof/checkpoints"
  mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
  mgr.save(7, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
  mgr.wait_until_finished()
  fresh = ocp.CheckpointManager(directory)
  assert fresh.latest_step() == 7
  restored = fresh.restore(7, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=state))).state
  np.testing.assert_array_equal(restored["w"], state["w"])
  np.testing.assert_array_equal(restored["b"]["p"], state["b"]["p"])
  names = gcs_emulator.list_objects(gcs_env, "bucket", "orbax_proof/")
  assert "orbax_proof/checkpoints/7/_CHECKPOINT_METADATA" in names
  assert any("/ocdbt.process_0/" in n for n in names)  # the arrays, written by tensorstore
  assert not os.path.exists(tmp_path / "gs:")


def test_epath_reads_and_writes_the_emulator(gcs_env, tmp_path):
  p = epath.Path("gs://bucket/epath_proof/a/results.json")
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text('{"mAP": 1.0}')
  assert epath.Path("gs://bucket/epath_proof/a/results.json").read_text() == '{"mAP": 1.0}'
  assert "epath_proof/a/results.json" in gcs_emulator.list_objects(gcs_env, "bucket")
  assert not os.path.exists(tmp_path / "gs:")


# ----------------------------------------------------------------------------------------------
# main.py with --workdir=gs://bucket/run: train, killed after a checkpoint, resumed, evaluated
# in a fresh process; everything lands in the emulator, nothing in a local `gs:` folder.


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo"))
  demo.build(root, seed=0)
  return root


def _objects(url, prefix):
  return set(gcs_emulator.list_objects(url, "bucket", prefix))


def test_gs_workdir_trains_resumes_evaluates_and_extracts(gcs_url, demo_root, tmp_path):
  workdir = "gs://bucket/run"
  env = gcs_emulator.environment(gcs_url)
  common = (f"--config.data.root={demo_root}", "--config.train.num_steps=8",
            "--config.train.checkpoint_every=2")
  args = mp.main_args("in_batch", workdir, *common)
  procs = mp.start(args, 1, 8, str(tmp_path / "logs1"), extra_env=env, cwd=str(tmp_path))
  # On GCS (no rename) orbax marks a finished checkpoint with commit_success.txt.
  mp.wait_for(lambda: "run/checkpoints/2/commit_success.txt" in _objects(gcs_url, "run/"),
              procs, 240, "checkpoint 2 committed in the bucket")
  mp.kill(procs)
  assert "run/checkpoints/8/commit_success.txt" not in _objects(gcs_url, "run/"), (
      "the run ended before the kill")
  procs = mp.run(args, 1, 8, str(tmp_path / "logs2"), timeout=240, extra_env=env,
                 cwd=str(tmp_path))
  assert "resuming from step 2" in procs[0].tail(10**6)
  evaluate = mp.main_args("in_batch", workdir, *common, "--mode=evaluate",
                          "--config.eval.dataset=demo", f"--config.eval.root={demo_root}",
                          "--config.eval.pictures=1")
  procs = mp.run(evaluate, 1, 8, str(tmp_path / "logs3"), timeout=240, extra_env=env,
                 cwd=str(tmp_path))
  assert '"checkpoint_step": 8' in procs[0].tail(10**6)
  extract = [a for a in evaluate if a != "--mode=evaluate"] + ["--mode=extract"]
  mp.run(extract, 1, 8, str(tmp_path / "logs4"), timeout=240, extra_env=env, cwd=str(tmp_path))
  names = _objects(gcs_url, "run/")
  for part in ("query", "db"):
    for f in ("descriptors.npy", "images.txt", "config.json"):
      assert f"run/descriptors/demo_{part}/{f}" in names, sorted(names)[:60]
  for expected in ("run/checkpoints/8/_CHECKPOINT_METADATA", "run/metrics.jsonl",
                   "run/config_train.json", "run/results/evaluate_step8.json",
                   "run/results/evaluate_step8_top.png"):
    assert expected in names, sorted(names)[:40]
  assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*"))
  assert not os.path.exists(os.path.join(mp.REPO, "gs:"))


@pytest.mark.parametrize("bad", ["gs://no-such-bucket/run", "FILE/sub"])
def test_unwritable_workdir_fails_before_any_compute(gcs_url, tmp_path, bad):
  if bad.startswith("FILE"):
    (tmp_path / "a_file").write_text("")
    bad = str(tmp_path / "a_file" / "sub")
  args = mp.main_args("in_batch", bad, f"--config.data.root={tmp_path}/nothing")
  out = subprocess.run(args, cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                       env=dict(mp.env(8), **gcs_emulator.environment(gcs_url)))
  assert out.returncode == 2, out.stderr[-3000:]  # a user error: one line, no traceback
  assert f"cannot write the workdir {bad}" in out.stderr, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  assert "mesh" not in out.stderr  # nothing started


# ----------------------------------------------------------------------------------------------
# retrieval_jax/storage.py, the helpers behind it.


def test_storage_resolves_local_paths_and_keeps_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.resolve("gs://bucket/run/") == "gs://bucket/run"
  assert storage.resolve("run") == str(tmp_path / "run")
  assert storage.join("gs://bucket/run", "results", "a.json") == "gs://bucket/run/results/a.json"


def test_descriptor_folder_in_a_bucket_round_trips(gcs_env, tmp_path):
  """DescriptorWriter stages locally, uploads on close (config.json last); reading downloads."""
  x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  folder = "gs://bucket/desc_proof/demo_db"
  descriptor_store.save_descriptors(folder, x, [f"im{i}.jpg" for i in range(5)], '{"a": 1}')
  back = descriptor_store.load_descriptors(folder)
  np.testing.assert_array_equal(np.asarray(back["descriptors"]), x)
  assert back["images"] == [f"im{i}.jpg" for i in range(5)] and back["config"] == {"a": 1}
  assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*"))


# ----------------------------------------------------------------------------------------------
# describe, search (faiss index), local features and metrics with gs:// folders (issue 18).


def test_describe_and_search_write_to_a_bucket(gcs_env, tmp_path, monkeypatch):
  """describe.out, search.index and search.out in a bucket; the faiss index written locally
  and copied, read back through a local copy; nothing lands in a local `gs:` folder."""
  import jax  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from retrieval_jax import describe  # pylint: disable=import-outside-toplevel
  from retrieval_jax import extract  # pylint: disable=import-outside-toplevel
  from retrieval_jax import index_search as folder_search  # pylint: disable=import-outside-toplevel
  from retrieval_jax import sharding  # pylint: disable=import-outside-toplevel
  import tiny_models  # pylint: disable=import-outside-toplevel
  photos = tmp_path / "photos"
  photos.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 56, 3), np.uint8)).save(
        photos / f"{i}.jpg")
  (photos / "broken.jpg").write_bytes(b"not a jpeg")
  model = tiny_models.tiny_resnet("gem")
  variables = tiny_models.random_variables(model, image_size=32)
  mesh = sharding.make_mesh(devices=jax.devices()[:min(8, jax.device_count())])
  kw = dict(mesh=mesh, long_side=48, describe_fn=extract.make_describe_fn(model, mesh))
  index = "gs://bucket/photos_index"
  got = describe.describe_images(model, variables, str(photos), index, chunk=4, **kw)
  assert got["skipped"] == [str(photos / "broken.jpg")] and len(got["images"]) == 6
  names = _objects(gcs_env, "photos_index/")
  assert {f"photos_index/{f}" for f in ("descriptors.npy", "images.txt", "config.json",
                                       "skipped.txt")} <= names
  assert not any("/work/" in n for n in names)  # the shards are merged and deleted
  # The second search reuses the index the first wrote to the bucket: counted at the build
  # itself, not read from the log (another test in the same worker may have changed absl's
  # logging, and CI once saw no INFO lines at all here).
  builds = []
  build = folder_search._build_index  # pylint: disable=protected-access
  monkeypatch.setattr(folder_search, "_build_index",
                      lambda *a, **k: builds.append(1) or build(*a, **k))
  for _ in range(2):
    found = folder_search.search_folder(model, variables, index, str(photos / "3.jpg"),
                                        "gs://bucket/search_out", k=3, backend="faiss",
                                        factory="Flat", **kw)
  assert found["results"][0]["results"][0]["image"] == str(photos / "3.jpg")
  names = _objects(gcs_env, "")
  assert {"photos_index/faiss_Flat.index", "photos_index/faiss_Flat.index.json",
          "search_out/results.json"} <= names
  assert len(builds) == 1, f"the faiss index was built {len(builds)} times, not once and reused"
  # The photos themselves in a bucket: listed once, each read as bytes; same descriptors.
  storage.upload_folder(str(photos), "gs://bucket/photos")
  remote = describe.describe_images(model, variables, "gs://bucket/photos",
                                    str(tmp_path / "from_bucket"), chunk=4, **kw)
  assert remote["images"] == [f"gs://bucket/photos/{i}.jpg" for i in range(6)]
  assert remote["skipped"] == ["gs://bucket/photos/broken.jpg"]
  np.testing.assert_allclose(np.asarray(remote["descriptors"]),
                             np.asarray(got["descriptors"]), atol=1e-6)
  found = folder_search.search_folder(model, variables, index, "gs://bucket/photos/3.jpg",
                                      str(tmp_path / "search_local"), k=1, **kw)
  assert found["results"][0]["results"][0]["image"] == str(photos / "3.jpg")
  assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*"))


def test_local_features_and_metric_shards_in_a_bucket(gcs_env, monkeypatch):
  from retrieval_jax.local import keypoints  # pylint: disable=import-outside-toplevel
  from retrieval_jax.local import store as store_lib  # pylint: disable=import-outside-toplevel
  from retrieval_jax.train import loop  # pylint: disable=import-outside-toplevel
  writer = store_lib.LocalFeatureWriter("gs://bucket/local_proof", 3, 4, chunk_size=2)
  rec = {"locations": np.ones((2, 2), np.float32), "scales": np.ones(2, np.float32),
         "scores": np.arange(2, dtype=np.float32), "descriptors": np.eye(2, 4, dtype=np.float32)}
  for i in range(3):
    writer.add(i, rec if i != 1 else keypoints.empty_record(4))
  store = writer.close()
  np.testing.assert_array_equal(store[2]["descriptors"], rec["descriptors"])
  assert len(store[1]["scores"]) == 0
  # metrics.jsonl in a bucket: shards of SHARD_LINES lines, only the last one rewritten.
  monkeypatch.setattr(loop.MetricWriter, "SHARD_LINES", 3)
  metrics = loop.MetricWriter("gs://bucket/metrics_proof")
  for step in range(7):
    metrics.write(step, {"loss": float(step)})
  metrics.close()
  names = _objects(gcs_env, "metrics_proof/")
  assert names == {f"metrics_proof/metrics.jsonl{s}" for s in ("", ".1", ".2")}
  assert [r["step"] for r in loop.read_metrics("gs://bucket/metrics_proof")] == list(range(7))
  again = loop.MetricWriter("gs://bucket/metrics_proof")  # a resumed run appends
  again.write(7, {"loss": 7.0})
  assert [r["step"] for r in loop.read_metrics("gs://bucket/metrics_proof")] == list(range(8))


def test_demo_set_read_from_a_bucket_equals_the_local_copy(gcs_env, demo_root):
  """data.root=gs://...: the loaders, the completeness check, training batches and
  extraction read the uploaded demo set through epath and see the same pixels."""
  import jax  # pylint: disable=import-outside-toplevel
  from retrieval_jax import extract  # pylint: disable=import-outside-toplevel
  from retrieval_jax import sharding  # pylint: disable=import-outside-toplevel
  from retrieval_jax.data import datasets  # pylint: disable=import-outside-toplevel
  from retrieval_jax.data import grain_pipeline  # pylint: disable=import-outside-toplevel
  from retrieval_jax.data import integrity  # pylint: disable=import-outside-toplevel
  import tiny_models  # pylint: disable=import-outside-toplevel
  local = datasets.get_dataset("demo", demo_root, "test")
  train_l = datasets.get_dataset("demo", demo_root, "train")
  # meta.json and the images this test reads (uploading all ~1000 costs a minute).
  for path in ([os.path.join(demo_root, "demo-0", "meta.json")] + local.query_images[:3]
               + local.db_images[:9] + train_l.images[:40]):
    rel = os.path.relpath(path, demo_root)
    with open(path, "rb") as f:
      storage.write_bytes(f"gs://bucket/data/{rel}", f.read())
  remote = datasets.get_dataset("demo", "gs://bucket/data", "test")
  assert remote.db_images[0].startswith("gs://bucket/data/demo-0/images/")
  assert [os.path.basename(p) for p in remote.db_images] == [
      os.path.basename(p) for p in local.db_images]
  part = datasets.RetrievalSet("demo", remote.query_images[:3], remote.db_images[:9],
                               query_labels=remote.query_labels[:3],
                               db_labels=remote.db_labels[:9])
  assert integrity.check_retrieval_set(part).dataset is part  # every image found, readable
  missing = datasets.RetrievalSet("demo", part.query_images, part.db_images[:8] + [
      "gs://bucket/data/demo-0/images/nope.jpg"], query_labels=part.query_labels,
                                  db_labels=part.db_labels)
  checked = integrity.check_retrieval_set(missing, allow_missing=True)
  assert checked.missing_db == [("gs://bucket/data/demo-0/images/nope.jpg", "missing")]
  model = tiny_models.tiny_resnet("gem")
  variables = tiny_models.random_variables(model, image_size=32)
  mesh = sharding.make_mesh(devices=jax.devices()[:min(8, jax.device_count())])
  kw = dict(mesh=mesh, long_side=48, describe_fn=extract.make_describe_fn(model, mesh))
  np.testing.assert_array_equal(
      extract.extract_descriptors(model, variables, part.db_images, **kw),
      extract.extract_descriptors(model, variables, local.db_images[:9], **kw))
  train_r = datasets.get_dataset("demo", "gs://bucket/data", "train")
  batches = [grain_pipeline.make_train_batch_fn(t.images[:40], t.labels[:40], image_size=32,
                                                seed=0, num_steps=1, classes_per_batch=2,
                                                images_per_class=2)(0)
             for t in (train_l, train_r)]
  np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])
