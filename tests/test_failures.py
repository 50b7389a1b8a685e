"""Faults give a clear error or a counted, logged skip, never a plausible number (issue 11).

Each test provokes one failure and checks its message.
"""
import argparse
import importlib
import io
import json
import logging as std_logging
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import demo as demo_config
from retrieval_jax import checkpointing
from retrieval_jax import config_checks
from retrieval_jax import descriptor_settings
from retrieval_jax import errors
from retrieval_jax import paths
from retrieval_jax import run as run_lib
from retrieval_jax import sharding
from retrieval_jax.data import datasets
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import image_io
from retrieval_jax.data import integrity
from retrieval_jax.evaluation import pipeline
from retrieval_jax.evaluation import rerankers
from retrieval_jax.evaluation import test_set
from retrieval_jax.modes import evaluate as evaluate_mode
from retrieval_jax.models import pretrained
from retrieval_jax.models import retrieval_net
from retrieval_jax.models import weight_files
from retrieval_jax.train import loop as train_loop

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "revisited")


# ---------------------------------------------------------------------------------------
# Ground-truth pickles cannot run code.


def _s(text: str) -> bytes:
  """SHORT_BINUNICODE."""
  b = text.encode()
  return b"\x8c" + bytes([len(b)]) + b


def _call_chain(module: str, name: str, *calls: str) -> bytes:
  """Protocol 4: STACK_GLOBAL(module, name), then REDUCE with one string per call.

  `_call_chain("m", "f.__builtins__.get", "exec", code)` is `m.f.__builtins__.get("exec")
  (code)`: a getattr chain in the name and a call on a call's result.
  """
  out = b"\x80\x04" + _s(module) + _s(name) + b"\x93"
  for arg in calls:
    out += _s(arg) + b"\x85R"  # TUPLE1, REDUCE
  return out + b"."


def _global_call(module: str, name: str, arg: str) -> bytes:
  """Protocol 0: GLOBAL 'module name', then REDUCE with one string."""
  return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.fixture()
def marker(tmp_path):
  return tmp_path / "ran"


def _attacks(marker_path):
  code = f"open({str(marker_path)!r}, 'w').write('x')"
  return {
      "os.system": _global_call("os", "system", f"touch {marker_path}"),
      "posix.system": _global_call("posix", "system", f"touch {marker_path}"),
      "builtins.exec": _global_call("builtins", "exec", code),
      "builtins.eval": _global_call("builtins", "eval", code),
      # exec through a numpy module's globals: the hole of the former prefix rule.
      "numpy.testing getattr chain": _call_chain(
          "numpy.testing._private.utils", "integer_repr.__builtins__.get", "exec", code),
      "numpy dotted name": _call_chain("numpy", "testing._private.utils.os.system",
                                       f"touch {marker_path}"),
      "numpy module attribute": _call_chain("numpy.testing._private.utils", "os"),
      "builtins.getattr": _call_chain("builtins", "getattr", "x"),
      "allowed module, dotted name": _call_chain("numpy", "ndarray.__class__"),
      "scalar prefix": _call_chain("numpy", "int64.__init__"),
  }


@pytest.mark.parametrize("attack", sorted(_attacks("m")))
def test_crafted_ground_truth_pickles_run_nothing(tmp_path, marker, attack):
  data = _attacks(marker)[attack]
  path = tmp_path / "test" / "roxford5k" / "gnd_roxford5k.pkl"
  path.parent.mkdir(parents=True)
  path.write_bytes(data)
  with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
    datasets.get_dataset("roxford5k", str(tmp_path), check_images=False)
  assert not marker.exists()


def test_bytes_and_codecs_helpers_refuse_other_uses(marker):
  # encode(str) and bytes() as protocol 2 writes them are fine, other uses are refused.
  assert datasets.safe_load_pickle_bytes(_call_chain("_codecs", "encode", "abc")) == b"abc"
  bad_codec = (b"\x80\x04" + _s("_codecs") + _s("encode") + b"\x93" + _s("x") + _s("rot13")
               + b"\x86R.")
  with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):
    datasets.safe_load_pickle_bytes(bad_codec)
  huge = b"\x80\x04" + _s("builtins") + _s("bytes") + b"\x93J\x00\x10\x00\x00\x85R."
  with pytest.raises(pickle.UnpicklingError, match="bytes"):
    datasets.safe_load_pickle_bytes(huge)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_ground_truth_loads_under_every_protocol(protocol):
  gnd = {"gnd": [{"bbx": np.array([1.5, 2.0, 30.0, 40.5]), "easy": np.arange(3),
                  "hard": np.array([], np.int64), "junk": [np.int64(7)],
                  "ok": np.arange(4, dtype=np.int32)}],
         "imlist": ["a", "b"], "qimlist": ["q"], "e": b"", "b": b"abc",
         "f": np.float32(2.5), "flag": np.bool_(True), "t": np.float64}
  out = datasets.safe_load_pickle_bytes(pickle.dumps(gnd, protocol=protocol))
  g = out["gnd"][0]
  np.testing.assert_array_equal(g["bbx"], gnd["gnd"][0]["bbx"])
  np.testing.assert_array_equal(g["easy"], np.arange(3))
  assert g["junk"][0] == 7 and g["ok"].dtype == np.int32
  assert out["e"] == b"" and out["b"] == b"abc" and out["f"] == np.float32(2.5)
  assert out["t"] is np.float64


@pytest.mark.parametrize("name,queries,db", [("roxford5k", 70, 4993), ("rparis6k", 70, 6322)])
def test_real_revisited_ground_truth_still_loads(name, queries, db):
  path = os.path.join(SHARED, f"gnd_{name}.pkl")
  if not os.path.exists(path):
    pytest.skip("../shared/data is absent")
  cfg = datasets.safe_load_pickle(path)
  assert len(cfg["qimlist"]) == queries and len(cfg["imlist"]) == db
  assert set(cfg["gnd"][0]) == {"bbx", "easy", "hard", "junk"}


# ---------------------------------------------------------------------------------------
# Partial benchmark datasets: an error naming the count, the paths and the fix.


def _tiny_jpeg(path, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path)


def _partial_roxford(root, present=("a_1", "q_1")):
  """A 2-query, 5-image roxford5k of which only `present` images exist."""
  gnd = [{"bbx": [0, 0, 8, 8], "easy": [0, 2], "hard": [1], "junk": [3]},
         {"bbx": [1, 1, 9, 9], "easy": [4], "hard": [2], "junk": []}]
  cfg = {"imlist": ["a_1", "a_2", "b_1", "b_2", "c_1"], "qimlist": ["q_1", "q_2"],
         "gnd": gnd}
  folder = root / "test" / "roxford5k"
  (folder / "jpg").mkdir(parents=True)
  with open(folder / "gnd_roxford5k.pkl", "wb") as f:
    pickle.dump(cfg, f)
  for i, name in enumerate(present):
    _tiny_jpeg(folder / "jpg" / f"{name}.jpg", i)
  return datasets.get_dataset("roxford5k", str(root))


def test_partial_benchmark_is_an_error_naming_count_paths_and_download(tmp_path):
  rset = _partial_roxford(tmp_path)
  (tmp_path / "test" / "roxford5k" / "jpg" / "b_2.jpg").write_bytes(b"not an image")
  with pytest.raises(integrity.IncompleteDatasetError) as e:
    integrity.check_retrieval_set(rset, root=str(tmp_path))
  msg = str(e.value)
  assert "roxford5k: 5 images are missing or unreadable" in msg
  assert "(1 of 2 queries, 4 of 5 database images)" in msg
  assert "q_2.jpg (missing)" in msg and "b_2.jpg (unidentified)" in msg
  assert f"python -m retrieval_jax.data.download roxford5k --dir {tmp_path}" in msg
  assert "eval.allow_missing=True" in msg
  assert isinstance(e.value, FileNotFoundError)  # A user error (exit code 2).


def test_allow_missing_drops_db_images_and_removes_queries(tmp_path, caplog):
  rset = _partial_roxford(tmp_path, present=("a_1", "b_1", "c_1", "q_1"))
  with caplog.at_level(std_logging.WARNING):
    out = integrity.check_retrieval_set(rset, root=str(tmp_path), allow_missing=True)
  assert "allow_missing=True" in caplog.text
  assert out.summary() == {"missing_queries": 1, "missing_db_images": 2}
  got = out.dataset
  assert [os.path.basename(p) for p in got.query_images] == ["q_1.jpg"]
  assert [os.path.basename(p) for p in got.db_images] == ["a_1.jpg", "b_1.jpg", "c_1.jpg"]
  # Query 1: easy [a_1, b_1] -> [0, 1]; hard [a_2] and junk [b_2] are gone.
  np.testing.assert_array_equal(got.gnd[0]["easy"], [0, 1])
  assert len(got.gnd[0]["hard"]) == 0 and len(got.gnd[0]["junk"]) == 0
  assert got.query_bbx == [rset.query_bbx[0]]
  assert sorted(p for p, _ in out.entries) == sorted(
      [rset.query_images[1], rset.db_images[1], rset.db_images[3]])


def test_complete_benchmark_passes_unchanged(tmp_path):
  rset = _partial_roxford(tmp_path, present=("a_1", "a_2", "b_1", "b_2", "c_1", "q_1", "q_2"))
  out = integrity.check_retrieval_set(rset)
  assert out.dataset is rset and out.summary() == {"missing_queries": 0,
                                                    "missing_db_images": 0}


def test_skipped_list_is_written_with_every_file(tmp_path):
  counter = image_io.SkipCounter(max_examples=1)
  for i in range(7):
    counter.add("missing" if i % 2 else "truncated", f"/data/{i}.jpg")
  counter.add("missing", "/data/1.jpg")  # Seen twice, listed once.
  path = paths.write_skipped_list(str(tmp_path), "roxford5k", counter.entries)
  assert path == str(tmp_path / "results" / "roxford5k_skipped.txt")
  lines = open(path).read().splitlines()
  assert lines[0].startswith("# 7 skipped files")
  assert lines[1:] == [f"{'missing' if i % 2 else 'truncated'}\t/data/{i}.jpg"
                       for i in range(7)]
  assert paths.write_skipped_list(str(tmp_path / "none"), "none", []) is None
  assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------
# Training: a landmark whose images are all unreadable is dropped, not a crash.


def _landmarks(root, num, per, bad_labels=()):
  paths, labels = [], []
  for c in range(num):
    for v in range(per):
      p = os.path.join(root, f"{c}_{v}.jpg")
      if c in bad_labels:
        with open(p, "wb") as f:
          f.write(b"\xff\xd8\xff broken" * 4)
      else:
        _tiny_jpeg(p, 10 * c + v)
      paths.append(p)
      labels.append(c)
  return paths, np.asarray(labels, np.int32)


def test_unreadable_landmark_is_dropped_with_a_warning_and_count(tmp_path, caplog):
  paths, labels = _landmarks(str(tmp_path), 6, 3, bad_labels=(2,))
  counter = image_io.SkipCounter()
  fn = grain_pipeline.make_train_batch_fn(paths, labels, classes_per_batch=3,
                                          images_per_class=2, image_size=8, seed=0,
                                          num_steps=20, skipped=counter)
  drawn = False
  with caplog.at_level(std_logging.WARNING):
    for step in range(20):
      want = labels[fn.global_rows(step)]
      batch = fn(step)
      drawn |= bool((want == 2).any())
      assert batch["image"].shape == (6, 8, 8, 3) and not (batch["label"] == 2).any()
      # Rows of the other landmarks are untouched.
      np.testing.assert_array_equal(batch["label"][want != 2], want[want != 2])
  assert drawn and fn.dropped_labels == {2}
  assert "Landmark 2 dropped: none of its 3 images could be decoded" in caplog.text
  assert "1 landmarks dropped so far" in caplog.text
  again = grain_pipeline.make_train_batch_fn(paths, labels, classes_per_batch=3,
                                             images_per_class=2, image_size=8, seed=0,
                                             num_steps=20)
  for step in range(20):  # Replacements are a function of (seed, step, row, files).
    np.testing.assert_array_equal(again(step)["label"], fn(step)["label"])


def test_training_stops_when_too_few_landmarks_remain(tmp_path):
  paths, labels = _landmarks(str(tmp_path), 3, 2, bad_labels=(1,))
  fn = grain_pipeline.make_train_batch_fn(paths, labels, classes_per_batch=3,
                                          images_per_class=2, image_size=8, seed=0,
                                          num_steps=2)
  with pytest.raises(RuntimeError, match="only 2 of 3 landmarks have a readable image, a "
                     "batch needs 3"):
    fn(0)


def test_drop_unreadable_train_removes_images_landmarks_and_pairs(tmp_path, caplog):
  paths, labels = _landmarks(str(tmp_path), 4, 3, bad_labels=(1,))
  os.remove(paths[6])  # One image of landmark 2 is missing: 2 readable remain.
  os.remove(paths[9])
  os.remove(paths[10])  # Landmark 3 keeps one image: no positive pair, dropped.
  tset = datasets.TrainSet("t", paths, labels, qidxs=np.array([0, 3, 7, 11]),
                           pidxs=np.array([1, 4, 8, 9]))
  with caplog.at_level(std_logging.WARNING):
    out = integrity.drop_unreadable_train(tset, min_landmarks=2)
  assert "2 of 4 landmarks dropped" in caplog.text and "1 with none: [1]" in caplog.text
  assert sorted(out.dropped_landmarks) == [1, 3]
  assert len(out.skipped) == 6
  assert out.train_set.images == [paths[i] for i in (0, 1, 2, 7, 8, 11)]
  np.testing.assert_array_equal(out.train_set.labels, [0, 0, 0, 2, 2, -1])
  np.testing.assert_array_equal(out.train_set.qidxs, [0, 3])  # (0,1) and (7,8) remain.
  np.testing.assert_array_equal(out.train_set.pidxs, [1, 4])
  with pytest.raises(ValueError, match="only 2 landmarks have 2 or more readable images, "
                     "a batch needs 3.*data.classes_per_batch"):
    integrity.drop_unreadable_train(tset, min_landmarks=3)


# ---------------------------------------------------------------------------------------
# Config values are checked before any compute, each error naming its key.


def _demo():
  return demo_config.get_config()


def _problem(edit, mode="train"):
  c = _demo()
  edit(c)
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.validate(c, mode)
  return str(e.value)


@pytest.mark.parametrize("key,value,words", [
    ("train.checkpoint_every", 0, "config.train.checkpoint_every=0 must be a positive"),
    ("train.log_every", -5, "config.train.log_every=-5 must be a positive"),
    ("data.image_size", 0, "config.data.image_size=0 must be a positive"),
    ("extract.long_side", -1, "config.extract.long_side=-1 must be a positive"),
    ("data.crop_scale", ("oops",), "config.data.crop_scale=('oops',) must be a tuple of two"),
    ("data.crop_scale", (0.5, 2.0), "config.data.crop_scale=(0.5, 2.0) must be a tuple"),
    ("extract.scales", ("(1,0.5)",), "config.extract.scales=('(1,0.5)',) must be a tuple"),
    ("model.dtype", "bfloat17", "config.model.dtype='bfloat17' is not a dtype name"),
    ("model.pooling", "gem2", "config.model.pooling='gem2' is not one of"),
    ("model.backbone", "resnet5", "config.model.backbone='resnet5' is not one of"),
    ("eval.dataset", "roxford", "config.eval.dataset='roxford' is not one of"),
    ("data.name", "sfm120k", "config.data.name='sfm120k' is not one of"),
    ("eval.whitening", "lw", "config.eval.whitening='lw' is not one of ['', 'learned', 'pca'"),
    ("extract.resample", "bicubic", "config.extract.resample must be one of"),
    ("extract.exif_transpose", "sometimes", "config.extract.exif_transpose must be"),
    ("train.num_steps", 0, "config.train.num_steps=0: there is nothing to train"),
])
def test_bad_config_value_names_its_key(key, value, words):
  section, field = key.split(".")

  def edit(c):
    c[section][field] = value
  assert words in _problem(edit)


def test_backbone_kwargs_of_another_backbone_name_the_key_and_options():
  # The demo config sets frozen_blocks for mobilenet_v2; resnet50 has no such option.
  msg = _problem(lambda c: setattr(c.model, "backbone", "resnet50"))
  assert msg.startswith("config.model.backbone_kwargs: frozen_blocks not taken by backbone "
                        "'resnet50'")
  assert "bn_mode" in msg and "depth" in msg


def test_every_problem_is_listed_and_evaluate_allows_zero_steps():
  def edit(c):
    c.train.log_every = 0
    c.model.dtype = "f32"
    c.train.num_steps = 0
  msg = _problem(edit)
  assert msg.startswith("invalid config:")
  assert "train.log_every" in msg and "model.dtype" in msg and "num_steps" in msg
  c = _demo()
  c.train.num_steps = 0
  config_checks.validate(c, "evaluate")  # Evaluating the pretrained network needs no steps.


@pytest.mark.parametrize("name", ["demo", "gem_resnet101", "gem_vgg16", "rmac_resnet101",
                                  "netvlad_vgg16", "msnetvlad_resnet50",
                                  "arcface_gldv2_resnet50"])
def test_shipped_configs_are_valid(name):
  module = importlib.import_module(f"configs.{name}")
  for mode in ("train", "extract", "evaluate"):
    config_checks.validate(module.get_config(), mode)


# ---------------------------------------------------------------------------------------
# User errors: one clear message and exit code 2; --verbose keeps the traceback.


def _missing_dataset(root):
  return datasets.get_dataset("rparis6k", root)


def test_user_error_prints_the_message_and_exits_2(tmp_path, monkeypatch):
  monkeypatch.delenv(errors.VERBOSE_ENV, raising=False)
  out = io.StringIO()
  with pytest.raises(SystemExit) as e:
    errors.report_user_errors(_missing_dataset, str(tmp_path), stream=out)
  assert e.value.code == 2
  text = out.getvalue()
  assert text.startswith("error: rparis6k: missing file ")
  assert "python -m retrieval_jax.data.download rparis6k" in text
  assert "Traceback" not in text and errors.VERBOSE_ENV in text


def test_verbose_keeps_the_traceback_and_bugs_are_not_user_errors(tmp_path, monkeypatch):
  monkeypatch.delenv(errors.VERBOSE_ENV, raising=False)
  with pytest.raises(datasets.DatasetNotFoundError):
    errors.report_user_errors(_missing_dataset, str(tmp_path), verbose=True)
  monkeypatch.setenv(errors.VERBOSE_ENV, "1")
  with pytest.raises(datasets.DatasetNotFoundError):
    errors.report_user_errors(_missing_dataset, str(tmp_path))
  monkeypatch.delenv(errors.VERBOSE_ENV)
  with pytest.raises(ZeroDivisionError):  # A bug keeps its traceback.
    errors.report_user_errors(lambda: 1 / 0)
  c = _demo()
  c.train.log_every = 0
  out = io.StringIO()
  with pytest.raises(SystemExit):
    errors.report_user_errors(config_checks.validate, c, "train", stream=out)
  assert out.getvalue().startswith("error: config.train.log_every=0 must be a positive")


# ---------------------------------------------------------------------------------------
# Weight files, checkpoints, NaN, modes.


def test_corrupt_weight_files_say_not_a_weight_file(tmp_path):
  for name, data in (("garbage.pth", b"\x00\x01 definitely not torch" * 10),
                     ("truncated.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"),
                     ("garbage.npz", b"PK\x03\x04 broken zip" * 5)):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(errors.NotAWeightFileError) as e:
      pretrained.load_backbone_variables("resnet18", str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a weight file")
    assert "weights_only=False" not in msg and ".npz converted by" in msg
    assert errors.is_user_error(e.value)


def test_weight_file_with_code_is_refused_without_suggesting_weights_only_false(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "pickled_object.pth"
  torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, str(path))
  with pytest.raises(errors.NotAWeightFileError) as e:
    pretrained.load_backbone_variables("resnet18", str(path))
  msg = str(e.value)
  assert "is not a weight file (it holds Python objects other than tensors" in msg
  assert "weights_only" not in msg


def test_foreign_npz_is_named_as_such_and_ours_loads(tmp_path):
  foreign = tmp_path / "keras.npz"
  np.savez(foreign, conv1_W=np.zeros(3), conv1_b=np.zeros(3))
  with pytest.raises(errors.NotAWeightFileError,
                     match="is an .npz file but not one converted by retrieval_jax: its arrays "
                     r"are named \['conv1_W', 'conv1_b'\]"):
    pretrained.load_backbone_variables("resnet18", str(foreign))
  ours = tmp_path / "ours.npz"
  weight_files.save_npz({"params": {"conv": {"kernel": np.ones((2, 2))}},
                       "batch_stats": {"bn": {"mean": np.zeros(2)}}}, str(ours))
  back = weight_files.load_npz(str(ours))
  np.testing.assert_array_equal(back["params"]["conv"]["kernel"], np.ones((2, 2)))


def test_missing_checkpoint_step_lists_the_saved_steps(tmp_path):
  workdir = str(tmp_path)
  mgr = checkpointing.manager(workdir, keep=5)
  state = {"params": {"w": np.ones((2,), np.float32)}}
  for step in (2, 4):
    checkpointing.save(mgr, step, state)
  mgr.wait_until_finished()
  abstract = {"params": {"w": jax.ShapeDtypeStruct((2,), np.float32)}}
  with pytest.raises(errors.CheckpointNotFoundError) as e:
    checkpointing.restore_variables(workdir, abstract, 3)
  assert str(e.value).startswith("extract.checkpoint_step=3: there is no such checkpoint")
  assert "the steps saved there are [2, 4]" in str(e.value)
  _, step = checkpointing.restore_variables(workdir, abstract, 4)
  assert step == 4


def test_nan_stop_never_points_to_a_checkpoint_that_does_not_exist():
  with pytest.raises(train_loop.NonFiniteLossError) as e:
    train_loop._check_finite(7, {"loss": float("nan")}, 0)  # pylint: disable=protected-access
  msg = str(e.value)
  assert msg.startswith("loss is nan at step 7") and "no checkpoint was written" in msg
  assert "resume" not in msg and "starts again from the initial weights" in msg
  with pytest.raises(train_loop.NonFiniteLossError,
                     match=r"the last good checkpoint \(step 5\) is kept; after the change, the "
                     "same command resumes from it"):
    train_loop._check_finite(7, {"loss": float("inf")}, 5)  # pylint: disable=protected-access
  assert errors.is_user_error(e.value)


def test_unknown_mode_and_bad_config_fail_before_any_work(tmp_path):
  c = _demo()
  with pytest.raises(config_checks.ConfigError, match="--mode='trian' is not one of"):
    run_lib.run("trian", c, str(tmp_path))
  c.train.checkpoint_every = 0
  with pytest.raises(config_checks.ConfigError, match="config.train.checkpoint_every=0"):
    run_lib.run("train", c, str(tmp_path))
  assert not os.listdir(tmp_path)  # Nothing was built, downloaded or compiled.


def test_evaluate_without_checkpoint_is_labelled_off_the_shelf(tmp_path, capsys):
  """A real `--mode=evaluate` of a tiny ResNet-18 weight file on the demo set, no checkpoint."""
  torch = pytest.importorskip("torch")
  from retrieval_jax.data import demo  # pylint: disable=import-outside-toplevel
  import torch_reference  # pylint: disable=import-outside-toplevel
  root = str(tmp_path / "data")
  demo.build(root, seed=0)
  torch.manual_seed(0)
  net = torch_reference.ResNet(18, width=8)
  weights = str(tmp_path / "tiny_resnet18.pth")
  torch.save(torch_reference.randomize_batch_norm(net).state_dict(), weights)
  c = _demo()
  with c.unlocked():
    c.data.root = root
    c.model.backbone = "resnet18"
    c.model.backbone_kwargs = {"bn_mode": "frozen_stats", "width": 8}
    c.model.pretrained = weights
    c.extract.long_side = 64
    c.eval.pictures = 0
  workdir = str(tmp_path / "wd")
  out = run_lib.run("evaluate", c, workdir)
  label = "off-the-shelf (pretrained weights, no checkpoint)"
  assert set(out) == {label}
  assert 0 <= out[label]["mAP"] <= 100
  printed = capsys.readouterr().out
  assert f"[{label}] >> labels: mAP {out[label]['mAP']:.2f}" in printed
  assert "[after]" not in printed


# ---------------------------------------------------------------------------------------
# Evaluation of a partial benchmark, in process (tiny network).


@pytest.fixture(scope="module")
def tiny_net():
  model = retrieval_net.RetrievalNet(
      backbone="resnet18", backbone_kwargs={"width": 8, "stage_sizes": (1, 1, 1, 1)},
      pooling="gem")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
  mesh = sharding.make_mesh(devices=jax.devices()[:min(8, jax.device_count())])
  return model, variables, mesh


def _evaluate(config, model, variables, mesh, test, workdir, tag="eval"):
  """The evaluation pipeline's global stage on a checked test set."""
  settings = descriptor_settings.build(config, model, variables, test.dataset.name)
  context = rerankers.Context(config, workdir, tag, model, variables, mesh, settings, test)
  return pipeline.evaluate(context, pipeline.Stages())


def test_evaluate_on_a_partial_benchmark_stops_before_extracting(tmp_path):
  rset = _partial_roxford(tmp_path / "data")
  with pytest.raises(integrity.IncompleteDatasetError, match="5 images are missing"):
    # No model: the check comes before anything is extracted.
    test_set.check(rset, root=str(tmp_path / "data"))


def test_allow_missing_evaluates_without_them_and_records_it(tmp_path, tiny_net):
  model, variables, mesh = tiny_net
  everything = ("a_1", "a_2", "b_1", "b_2", "c_1", "q_1", "q_2")
  rset = _partial_roxford(tmp_path / "data", present=everything)
  folder = tmp_path / "data" / "test" / "roxford5k" / "jpg"
  # b_2 has a valid header but a truncated body: found only while extracting.
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
      folder / "b_2.jpg", format="JPEG", quality=95)
  data = (folder / "b_2.jpg").read_bytes()
  (folder / "b_2.jpg").write_bytes(data[:len(data) * 2 // 3])
  c = _demo()
  c.extract.long_side, c.extract.batch_size = 32, 8
  wd = str(tmp_path / "wd")
  with pytest.raises(integrity.IncompleteDatasetError,
                     match=r"roxford5k: 1 images could not be decoded \(0 of 2 queries, 1 of 5"):
    _evaluate(c, model, variables, mesh, test_set.check(rset, root=str(tmp_path / "data")),
              wd)
  listed = open(os.path.join(wd, "results", "roxford5k_skipped.txt")).read()
  assert "truncated\t" in listed and "b_2.jpg" in listed
  os.remove(folder / "q_2.jpg")
  os.remove(folder / "a_2.jpg")
  result = _evaluate(c, model, variables, mesh, test_set.check(rset, allow_missing=True), wd,
                     tag="partial")
  assert result["missing_queries"] == 1 and result["missing_db_images"] == 2
  assert "evaluated WITHOUT 1 missing queries and 2 missing database images" in (
      result["lines"][-1])
  saved = json.load(open(os.path.join(wd, "results", "partial.json")))
  assert saved["missing_db_images"] == 2
  listed = open(os.path.join(wd, "results", "roxford5k_skipped.txt")).read().splitlines()
  assert listed[0] == "# 3 skipped files: <reason>\t<path>"
  assert {line.split("\t")[1].rsplit("/", 1)[1] for line in listed[1:]} == {
      "q_2.jpg", "a_2.jpg", "b_2.jpg"}


# ---------------------------------------------------------------------------------------
# A mistyped flag or config key: one line naming it, exit code 2, before JAX is imported.

_MAIN_IN_PROCESS = """
import runpy, sys
sys.argv = ["main.py"] + sys.argv[1:]
try:
  runpy.run_path("main.py", run_name="__main__")
except SystemExit as e:
  print("exit", e.code, "jax imported" if "jax" in sys.modules else "jax not imported")
"""


@pytest.mark.parametrize("arg,named", [
    ("--config.nope=1", "unknown config key 'config.nope'"),
    ("--config.optim.lrr=1", "unknown config key 'config.optim.lrr' (did you mean 'lr'?)"),
    ("--nosuchflag=3", "Unknown command line flag 'nosuchflag'"),
])
def test_bad_flag_prints_one_line_and_exits_2_before_jax(tmp_path, arg, named):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-c", _MAIN_IN_PROCESS, "--config=configs/demo.py",
       f"--workdir={tmp_path / 'wd'}", arg],
      cwd=repo, capture_output=True, text=True, timeout=120)
  assert out.stdout.strip() == "exit 2 jax not imported", out.stdout + out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], out.stderr
  assert not os.path.exists(tmp_path / "wd")
