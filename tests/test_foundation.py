"""The foundation slice: config flags, the demo set, the sharded demo step, train -> restore -> extract."""
import json
import os
import subprocess
import sys

from absl import flags
import jax
import numpy as np
import pytest
from ml_collections import config_flags

from retrieval_jax import sharding
from retrieval_jax.data import datasets
from retrieval_jax.data import demo
from retrieval_jax.data import grain_pipeline
from retrieval_jax.train import state as train_state
from retrieval_jax.train import step as train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.py")


def parse_config(*overrides):
  argv = ["prog", f"--config={DEMO_CONFIG}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_config_overrides_reach_nested_fields():
  c = parse_config("--config.optim.lr=0.25", "--config.loss.num_negatives=7",
                   "--config.model.pooling_kwargs.p_init=2.5", "--config.mesh.shape=(2,4)")
  assert c.optim.lr == 0.25 and c.loss.num_negatives == 7
  assert c.model.pooling_kwargs.p_init == 2.5
  assert tuple(c.mesh.shape) == (2, 4)
  assert c.model.backbone == "mobilenet_v2"  # untouched defaults stay


def test_mistyped_config_key_fails_naming_it():
  with pytest.raises(Exception, match="lrr"):
    parse_config("--config.optim.lrr=1")


def test_main_rejects_mistyped_key_before_any_work(tmp_path):
  out = subprocess.run([sys.executable, "main.py", f"--config={DEMO_CONFIG}",
                        f"--workdir={tmp_path}", "--config.train.num_stepz=3"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "num_stepz" in out.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo"))
  demo.build(root, seed=0)
  return root


def test_demo_set_is_deterministic_by_seed(demo_root, tmp_path):
  again = demo.build(str(tmp_path / "a"), seed=0)
  other = demo.build(str(tmp_path / "b"), seed=1)
  first = os.path.join(demo_root, "demo-0")
  assert demo.fingerprint(again) == demo.fingerprint(first)
  assert demo.fingerprint(other) != demo.fingerprint(first)


def test_demo_splits_hold_out_whole_landmarks(demo_root):
  train = datasets.get_dataset("demo", demo_root, "train")
  test = datasets.get_dataset("demo", demo_root, "test")
  assert not set(train.labels.tolist()) & set(test.db_labels.tolist())
  assert set(test.query_labels.tolist()) == set(test.db_labels.tolist())
  assert len(test.query_images) == len(set(test.query_labels.tolist()))  # one query each
  assert len(train.images) >= 500 and len(test.db_images) >= 150
  assert np.bincount(train.labels).max() >= 4  # enough views for K x M batches


def _gray_thumb(image: np.ndarray, side: int = 16) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  t = np.asarray(Image.fromarray(image).convert("L").resize((side, side), Image.BILINEAR),
                 np.float64).ravel()
  t -= t.mean()
  return t / (np.linalg.norm(t) + 1e-9)


def test_demo_real_splits_hold_only_real_multi_view_groups_unseen_in_training(demo_root):
  """'real' / 'val_real': different real photos of one place, no place or photo trained on."""
  meta = json.load(open(os.path.join(demo_root, "demo-0", "meta.json")))
  train = datasets.get_dataset("demo", demo_root, "train")
  real = datasets.get_dataset("demo", demo_root, "real")
  val_real = datasets.get_dataset("demo", demo_root, "val_real")
  groups = meta["real_groups"]
  real_ids, val_ids = set(real.db_labels.tolist()), set(val_real.db_labels.tolist())
  assert not real_ids & val_ids and real_ids | val_ids == set(range(len(groups)))
  assert len(real_ids) >= 8 and len(val_ids) >= 3
  for split in (real, val_real):
    assert list(split.query_images) == list(split.db_images)  # every photo queries
    labels = np.asarray(split.db_labels)
    for i, g in enumerate(split.gnd):
      same = np.flatnonzero(labels == labels[i])
      assert len(same) >= 2, (split.name, split.db_images[i])  # a group, not a single
      assert sorted(g["ok"].tolist()) == sorted(set(same.tolist()) - {i})
      assert g["junk"].tolist() == [i]
  # Each group is several different photographs (not warps of one): named by 2+ source
  # files, or frames of the campus walk / a stereo pair; and none of its source files is
  # one a synthetic (trainable) landmark comes from.
  synthetic_files = {name.split(":", 1)[1].split("#")[0] for name in meta["landmarks"]}
  for name in groups:
    source, what = name.split(":", 1)
    files = what.split("+")
    assert len(files) >= 2 or what.startswith("campus") or what.startswith("stereo"), name
    assert not set(files) & synthetic_files, name
  # Pixels: no real photo looks like a training view's source tile (16 x 16 correlation),
  # and the photos of one group are not copies of each other.
  real_paths = list(real.db_images) + list(val_real.db_images)
  real_thumbs = np.stack([_gray_thumb(np.asarray(_load(p))) for p in real_paths])
  train_names = {meta["landmarks"][i] for i in set(
      int(os.path.basename(p).split("_")[0]) for p in train.images)}
  tiles = [photos[0] for name, photos in demo.source_landmarks() if name in train_names]
  assert len(tiles) == train.num_classes
  tile_thumbs = np.stack([_gray_thumb(t) for t in tiles])
  assert np.max(real_thumbs @ tile_thumbs.T) < 0.95
  labels = np.concatenate([real.db_labels, val_real.db_labels])
  sim = real_thumbs @ real_thumbs.T
  for i in range(len(labels)):
    for j in range(i + 1, len(labels)):
      if labels[i] == labels[j]:
        assert sim[i, j] < 0.999, (real_paths[i], real_paths[j])


def _revisitop_ap(ranks, ok, junk):
  """revisitop's compute_ap (trapezoidal precision) on one ranking, junk removed first."""
  ranks = [r for r in ranks if r not in set(junk)]
  pos = [i for i, r in enumerate(ranks) if r in set(ok)]
  ap = 0.0
  for j, rank in enumerate(pos):
    precision_0 = 1.0 if rank == 0 else j / rank
    ap += (precision_0 + (j + 1) / (rank + 1)) / 2 / len(pos)
  return ap


def test_demo_real_evaluator_is_revisitop_map_with_the_query_junk():
  from retrieval_jax import evaluation  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  x = rng.normal(size=(7, 16)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  labels = np.asarray([0, 0, 1, 1, 1, 2, 2])
  gnd = [{"ok": np.flatnonzero((labels == l) & (np.arange(7) != i)),
          "junk": np.asarray([i])} for i, l in enumerate(labels)]
  got = evaluation.evaluate_descriptors("demo_real", x, x, {"gnd": gnd})
  order = np.argsort(-(x @ x.T), axis=1)
  want = 100 * np.mean([_revisitop_ap(list(order[i]), g["ok"].tolist(), [i])
                        for i, g in enumerate(gnd)])
  assert got["mAP"] == pytest.approx(want, abs=1e-4)
  assert got["lines"] == [f">> demo_real: mAP {want:.2f}"]


def _load(path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return Image.open(path).convert("RGB")


def _demo_config(root, **train):
  c = parse_config()
  with c.unlocked():
    c.data.root = root
    c.data.image_size = 64
    c.data.classes_per_batch = 4
    c.data.images_per_class = 4
    for k, v in train.items():
      c.train[k] = v
  return c


def test_sharded_demo_step_equals_single_device(demo_root):
  """The same global batch gives the same loss and update on 1 and on 8 devices."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  c = _demo_config(demo_root)
  with c.unlocked():
    # SGD makes the update linear in the gradient; Adam's first step is ~lr * sign(g), which
    # would amplify float noise in gradients that are ~0.
    c.optim.name, c.optim.lr = "sgd", 0.1
  train = datasets.get_dataset("demo", demo_root, "train")
  ds = grain_pipeline.train_dataset(train.images, train.labels, classes_per_batch=4,
                                    images_per_class=4, image_size=64, seed=0, num_steps=1)
  host_batch = ds[0]
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh((-1,), ("data",), devices=devices)
    model, tx, state = train_state.create(c, mesh)
    step = train_step.compile_train_step(model, tx, c.loss, mesh, state)
    batch = sharding.to_global(host_batch, mesh)
    assert len(batch["image"].sharding.device_set) == len(devices)
    before = jax.device_get(state.params)  # `step` donates `state`.
    new_state, metrics = step(state, batch)
    update = jax.tree_util.tree_map(lambda new, old: new - old,
                                    jax.device_get(new_state.params), before)
    results.append((float(metrics["loss"]), float(metrics["grad_norm"]), update))
  (loss1, gn1, update1), (loss8, gn8, update8) = results
  assert loss1 > 0 and gn1 > 0
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  np.testing.assert_allclose(gn8, gn1, rtol=1e-4)
  # Per tensor, the update agrees to 0.1% of its largest entry (float32 sums over the batch
  # run in a different order on 8 devices).
  for a, b in zip(jax.tree_util.tree_leaves(update1), jax.tree_util.tree_leaves(update8)):
    np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max() + 1e-12)


def test_train_checkpoint_restore_extract_end_to_end(demo_root, tmp_path):
  """Train a few steps on 8 devices, then a fresh process restores and evaluates/extracts."""
  workdir = str(tmp_path / "run")
  common = [f"--config={DEMO_CONFIG}", f"--workdir={workdir}",
            f"--config.data.root={demo_root}", "--config.data.image_size=64",
            "--config.data.classes_per_batch=4", "--config.data.images_per_class=2",
            "--config.extract.long_side=96", "--config.extract.batch_size=8",
            "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
            "--config.train.log_every=1", "--config.train.eval_every=2",
            "--config.eval.pictures=2"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  run = lambda *extra: subprocess.run([sys.executable, "main.py", *common, *extra], cwd=REPO,
                                      env=env, capture_output=True, text=True, timeout=600)
  out = run()
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 4/4" in out.stderr and "images/s" in out.stderr and "ETA" in out.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  trained = json.load(open(os.path.join(workdir, "results", "after.json")))
  periodic = json.load(open(os.path.join(workdir, "results", "step2.json")))
  logged = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [m["eval/mAP"] for m in logged if "eval/mAP" in m] == [periodic["mAP"]]

  out = run("--mode=evaluate")
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout[out.stdout.index("{"):])
  assert summary["checkpoint_step"] == 4
  # The restored params give the trained network's numbers, and the before number is kept.
  assert summary["after"]["mAP"] == pytest.approx(trained["mAP"], abs=1e-6)
  assert "before" in summary
  assert os.path.exists(os.path.join(workdir, "results", "evaluate_step4_top.png"))
  # eval.extra_splits=("real",) (configs/demo.py): the real views are scored beside the
  # synthetic ones, in the training run's files and again by the fresh process.
  evaluated = json.load(open(os.path.join(workdir, "results", "evaluate_step4.json")))
  before = json.load(open(os.path.join(workdir, "results", "before.json")))
  assert evaluated["real"]["mAP"] == pytest.approx(trained["real"]["mAP"], abs=1e-6)
  assert 0 < before["real"]["mAP"] <= 100 and "real" in periodic
  assert any(l.startswith("real: >> demo_real: mAP") for l in evaluated["lines"])

  out = run("--mode=extract")
  assert out.returncode == 0, out.stderr[-3000:]
  folder = os.path.join(workdir, "descriptors", "demo_db")
  d = np.load(os.path.join(folder, "descriptors.npy"))
  n = len(open(os.path.join(folder, "images.txt")).read().splitlines())
  assert d.shape == (n, 1280)
  np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-4)


def test_unknown_extra_split_fails_naming_it_and_the_splits(demo_root):
  from retrieval_jax.evaluation import test_set  # pylint: disable=import-outside-toplevel
  c = parse_config(f"--config.data.root={demo_root}", "--config.eval.extra_splits=('reals',)")
  with pytest.raises(ValueError, match=r"eval.extra_splits.*'reals'.*val_real"):
    test_set.load(c, str(demo_root))
  # The demo's own extra split on another dataset (the demo config over Revisited Oxford):
  # named before any file is read, with the override that drops it.
  c = parse_config("--config.eval.dataset=roxford5k", "--config.eval.root=/nonexistent")
  with pytest.raises(ValueError, match=r"eval.extra_splits: 'roxford5k' has no split 'real'.*"
                                       r"extra_splits='\(\)'"):
    test_set.load(c, str(demo_root))
