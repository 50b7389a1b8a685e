"""data.name=folder: your photos, one sub-folder per landmark, trained and evaluated.

A generated tree: 10 landmarks at depths 1 to 3, each seen in 4 synthetic views of a tile
of a real photograph (scikit-image; `demo.random_view`), a one-photo landmark, a photo
directly in the root, a broken JPEG and a text file. The split, the labels and the
held-out protocol are checked against the folder names; a `path<TAB>label` list of the
same photos gives the same sets; the tiny ResNet (a trunk weight file as
`model.pretrained`) trains 3 steps with configs/folder.py's recipe, is evaluated before and
after, again by --mode=evaluate in the same workdir, and the held-out mAP is recomputed
from --mode=extract's descriptors with a numpy transcription of revisitop's `compute_ap`
and the folder names as ground truth.
"""
import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import folder as folder_config
from retrieval_jax import errors
from retrieval_jax import run
from retrieval_jax.data import datasets
from retrieval_jax.data import demo
from retrieval_jax.data import folder
from retrieval_jax.models import weight_files
import tiny_models  # pylint: disable=g-bad-import-order

LANDMARKS = ("paris/eiffel", "paris/louvre", "rome/colosseum", "rome/forum/arch",
             "rome/forum/temple", "kyoto", "cats/chelsea", "space/rocket", "space/astronaut",
             "a/b/c/deep")
VIEWS = 4


def _photos():
  from skimage import data  # pylint: disable=import-outside-toplevel
  sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
             np.stack([data.camera()] * 3, -1)]
  tiles = []
  for photo in sources:
    h, w = photo.shape[:2]
    tiles += [photo[:, :w // 2], photo[:, w // 2:]]
  return tiles


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  tiles = _photos()
  for i, name in enumerate(LANDMARKS):
    os.makedirs(root / name, exist_ok=True)
    rng = np.random.default_rng(i)
    for v in range(VIEWS):
      (root / name / f"view_{v}.jpg").write_bytes(demo.random_view(tiles[i], rng, 64))
  os.makedirs(root / "lonely")
  (root / "lonely" / "only.jpg").write_bytes(
      demo.random_view(tiles[-1], np.random.default_rng(99), 64))
  (root / "stray.jpg").write_bytes(demo.random_view(tiles[-1], np.random.default_rng(98), 64))
  (root / "paris" / "eiffel" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  (root / "kyoto" / "notes.txt").write_text("not a photo")
  return str(root)


def _landmark(root, path):
  return os.path.relpath(os.path.dirname(path), root).replace(os.sep, "/")


def test_folders_become_training_and_held_out_landmarks(tree, caplog):
  folder._scan.cache_clear()  # pylint: disable=protected-access  (its log lines are checked)
  with caplog.at_level("WARNING"):
    train = datasets.get_dataset("folder", tree, "train", heldout_fraction=0.3, seed=0)
  said = caplog.text
  assert "1 unreadable files left out" in said and "broken.jpg" in said
  assert "1 landmarks have a single image" in said and "lonely" in said
  assert "1 images belong to no landmark" in said
  test = datasets.get_dataset("folder", tree, "test", heldout_fraction=0.3, seed=0)
  train_marks = {_landmark(tree, p) for p in train.images}
  test_marks = {_landmark(tree, p) for p in test.query_images}
  assert len(test_marks) == 3 and len(train_marks) == 7  # round(0.3 * 10) held out
  assert train_marks | test_marks == set(LANDMARKS) and not train_marks & test_marks
  # Labels from the folders: same folder <=> same label.
  names = [_landmark(tree, p) for p in train.images]
  for i in range(len(names)):
    for j in range(len(names)):
      assert (names[i] == names[j]) == (train.labels[i] == train.labels[j])
  assert len(train.images) == 7 * VIEWS  # the broken photo left out
  # Held out: one query per landmark (its first photo), the rest in the database with the
  # one-photo landmark and the root's photo as distractors (label -1, nobody's positive).
  assert [os.path.basename(p) for p in test.query_images] == ["view_0.jpg"] * 3
  db_marks = [_landmark(tree, p) for p in test.db_images]
  for mark in test_marks:
    assert db_marks.count(mark) == VIEWS - 1
  distractors = {p for p, l in zip(test.db_images, test.db_labels) if l == -1}
  assert distractors == {os.path.join(tree, "lonely", "only.jpg"),
                         os.path.join(tree, "stray.jpg")}
  assert set(test.query_labels) & set(test.db_labels[test.db_labels >= 0]) == set(
      test.query_labels)
  # The broken file is in no set and listed; the text file is not an image at all.
  broken = os.path.join(tree, "paris", "eiffel", "broken.jpg")
  assert [p for p, _ in train.skipped] == [broken]
  assert broken not in train.images and broken not in test.db_images
  # Seeded: the same seed, the same split; another seed, another split.
  again = datasets.get_dataset("folder", tree, "test", heldout_fraction=0.3, seed=0)
  assert again.query_images == test.query_images
  others = {tuple(datasets.get_dataset("folder", tree, "test", heldout_fraction=0.3,
                                       seed=s).query_images) for s in range(1, 5)}
  assert others - {tuple(test.query_images)}


def test_a_list_file_gives_the_same_sets(tree, tmp_path):
  listing = tmp_path / "photos.tsv"
  lines = ["# path<TAB>label"]
  for dirpath, _, files in sorted(os.walk(tree)):
    for f in sorted(files):
      mark = _landmark(tree, os.path.join(dirpath, f))
      if mark != "." and f.endswith(".jpg"):
        lines.append(f"{os.path.join(dirpath, f)}\tlabel {mark.upper()}")
  listing.write_text("\n".join(lines) + "\n\n")
  kw = dict(heldout_fraction=0.3, seed=0)
  for split in ("train", "test"):
    from_folder = datasets.get_dataset("folder", tree, split, **kw)
    from_list = datasets.get_dataset("folder", "/nonexistent", split,
                                     list_file=str(listing), **kw)
    if split == "train":
      assert from_list.images == from_folder.images
      np.testing.assert_array_equal(from_list.labels, from_folder.labels)
    else:
      assert from_list.query_images == from_folder.query_images
      # The root's stray photo has no label in the list: it is simply not listed.
      assert from_list.db_images == [p for p in from_folder.db_images
                                     if not p.endswith("stray.jpg")]
  bad = tmp_path / "bad.tsv"
  bad.write_text(f"{tree}/kyoto/view_0.jpg\tkyoto\n{tree}/kyoto/view_1.jpg kyoto\n")
  with pytest.raises(folder.FolderDatasetError, match="line 2: expected 'path<TAB>label'"):
    datasets.get_dataset("folder", "", "train", list_file=str(bad))


def _tiny_config(tmp, root):
  c = folder_config.get_config()
  c.data.root = root
  c.data.image_size = 32
  c.data.classes_per_batch, c.data.images_per_class = 4, 2
  c.model.backbone = "resnet18"
  c.model.backbone_kwargs = {"bn_mode": "frozen_stats", "width": 8, "stage_sizes": (1, 1, 1, 1)}
  c.optim.freeze = ""
  model = tiny_models.tiny_resnet("gem")
  variables = tiny_models.random_variables(model, image_size=32)
  weights = str(tmp / "tiny_trunk.npz")  # fine-tuning from a trunk weight file
  weight_files.save_npz({col: tree["backbone"] for col, tree in variables.items()}, weights)
  c.model.pretrained = weights
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 3, 1, 100
  c.extract.long_side, c.extract.batch_size = 64, 8
  c.eval.pictures = 2
  return c


def test_too_few_landmarks_for_a_batch_is_one_line(tree, tmp_path):
  c = _tiny_config(tmp_path, tree)
  c.data.classes_per_batch = 8
  out = io.StringIO()
  with pytest.raises(SystemExit) as e:
    errors.report_user_errors(run.run, "train", c, str(tmp_path / "work"), stream=out)
  assert e.value.code == errors.EXIT_CODE
  message = out.getvalue().splitlines()[0]
  assert "7 training landmarks" in message and "data.classes_per_batch=8" in message, message
  c = _tiny_config(tmp_path, "")
  with pytest.raises(ValueError, match="data.root=<folder"):
    run.run("train", c, str(tmp_path / "work"))


def _revisitop_ap(ranked_positive_positions, n_positives):
  """revisitop's compute_ap: trapezoidal precision at each positive's 0-based rank."""
  ap = 0.0
  for j, rank in enumerate(ranked_positive_positions):
    precision_0 = 1.0 if rank == 0 else j / rank
    precision_1 = (j + 1) / (rank + 1)
    ap += (precision_0 + precision_1) / (2 * n_positives)
  return ap


def test_train_evaluate_and_extract_on_a_folder(tree, tmp_path):
  c = _tiny_config(tmp_path, tree)
  workdir = str(tmp_path / "work")
  trained = run.run("train", c, workdir)
  before, after = trained["before"]["mAP"], trained["after"]["mAP"]
  assert 0 < before <= 100 and 0 < after <= 100
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
  results = os.path.join(workdir, "results")
  assert os.path.exists(os.path.join(results, "after_top.png"))  # pictures of 2 queries
  with open(os.path.join(results, "folder_skipped.txt")) as f:
    assert os.path.join(tree, "paris", "eiffel", "broken.jpg") in f.read()
  # A fresh evaluation of the final checkpoint gives the training run's "after".
  evaluated = run.run("evaluate", c, workdir)
  assert evaluated["after"]["mAP"] == pytest.approx(after, abs=1e-3)
  # The same number from the extracted descriptors and the folder names alone.
  run.run("extract", c, workdir)
  q = np.load(os.path.join(workdir, "descriptors", "folder_query", "descriptors.npy"))
  db = np.load(os.path.join(workdir, "descriptors", "folder_db", "descriptors.npy"))
  with open(os.path.join(workdir, "descriptors", "folder_query", "images.txt")) as f:
    queries = f.read().split()
  with open(os.path.join(workdir, "descriptors", "folder_db", "images.txt")) as f:
    database = f.read().split()
  assert len(queries) == 3 and len(database) == 3 * (VIEWS - 1) + 2
  aps = []
  for i, query in enumerate(queries):
    order = np.argsort(-(db.astype(np.float64) @ q[i].astype(np.float64)), kind="stable")
    positive = [_landmark(tree, database[j]) == _landmark(tree, query) for j in order]
    aps.append(_revisitop_ap(np.flatnonzero(positive), sum(positive)))
  assert 100 * np.mean(aps) == pytest.approx(after, abs=1e-3)
