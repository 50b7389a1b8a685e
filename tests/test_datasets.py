"""Tests for the dataset loaders: tiny fake copies in the reference layouts, plus the real
ground-truth files in ../shared/data where present."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from retrieval_jax.data import datasets
from retrieval_jax.data import gldv2
from retrieval_jax.data import sfm120k

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _dump(path: Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(obj, f)


def _touch(path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"")


def _assert_download_hint(err, name, root, fname=None):
  msg = str(err)
  assert f"python -m retrieval_jax.data.download {name} --dir {root}" in msg
  if fname is not None:
    assert str(fname) in msg


def test_registry_names_and_errors(tmp_path):
  for name in ("retrieval-sfm-120k", "retrieval-sfm-30k", "roxford5k", "rparis6k",
               "oxford5k", "paris6k", "revisitop1m", "roxford5k+1m", "rparis6k+1m",
               "holidays", "ukbench", "gldv2"):
    assert name in datasets.names()
  with pytest.raises(ValueError, match="unknown dataset"):
    datasets.get_dataset("no-such-set", str(tmp_path))
  with pytest.raises(ValueError, match="unknown split"):
    datasets.get_dataset("roxford5k", str(tmp_path), split="train")


# ------------------------------------------------------------------------------ SfM-120k

CIDS = ["0123456789abcdef0123", "fedcba9876543210aabb", "00112233445566778899",
        "aaaaaaaaaaaaaaaabbcc"]


def _fake_sfm(root: Path, nested_whiten=False):
  base = root / "train" / "retrieval-SfM-120k"
  db = {"train": {"cids": CIDS, "cluster": [7, 7, 3, 3], "qidxs": [0, 2],
                  "pidxs": [1, 3]},
        "val": {"cids": CIDS[:2], "cluster": [1, 1], "qidxs": [1], "pidxs": [0]}}
  _dump(base / "retrieval-SfM-120k.pkl", db)
  wh = {"cids": CIDS[::-1], "qidxs": [0, 1], "pidxs": [2, 3]}
  _dump(base / "retrieval-SfM-120k-whiten.pkl", {"val": wh} if nested_whiten else wh)
  _dump(root / "train" / "retrieval-SfM-30k" / "retrieval-SfM-30k-whiten.pkl",
        {"cids": CIDS[:3], "qidxs": [2], "pidxs": [1]})
  (base / "ims").mkdir()
  (root / "train" / "retrieval-SfM-30k" / "ims").symlink_to("../retrieval-SfM-120k/ims")


def test_cid2filename_matches_reference():
  assert sfm120k.cid2filename("abcdefgh", "/p") == "/p/gh/ef/cd/abcdefgh"


def test_sfm120k_train_and_val(tmp_path):
  _fake_sfm(tmp_path)
  ts = datasets.get_dataset("retrieval-sfm-120k", str(tmp_path))
  ims = tmp_path / "train" / "retrieval-SfM-120k" / "ims"
  assert isinstance(ts, datasets.TrainSet)
  assert ts.images[0] == str(ims / "23" / "01" / "ef" / CIDS[0])
  assert ts.images[1] == str(ims / "bb" / "aa" / "10" / CIDS[1])
  np.testing.assert_array_equal(ts.labels, [7, 7, 3, 3])
  np.testing.assert_array_equal(ts.qidxs, [0, 2])
  np.testing.assert_array_equal(ts.pidxs, [1, 3])
  assert ts.num_classes == 2
  val = datasets.get_dataset("retrieval-sfm-120k", str(tmp_path), split="val")
  assert len(val.images) == 2
  np.testing.assert_array_equal(val.qidxs, [1])


@pytest.mark.parametrize("nested", [False, True])
def test_sfm_whitening_pairs(tmp_path, nested):
  _fake_sfm(tmp_path, nested_whiten=nested)
  wh = datasets.get_dataset("retrieval-sfm-120k", str(tmp_path), split="whiten")
  assert os.path.basename(wh.images[0]) == CIDS[3]
  np.testing.assert_array_equal(wh.pidxs, [2, 3])
  assert (wh.labels == -1).all()
  wh30 = datasets.get_dataset("retrieval-sfm-30k", str(tmp_path))
  assert len(wh30.images) == 3
  assert wh30.images[2].startswith(str(tmp_path / "train" / "retrieval-SfM-30k" / "ims"))
  np.testing.assert_array_equal(wh30.qidxs, [2])
  with pytest.raises(datasets.DatasetNotFoundError, match="whiten"):
    datasets.get_dataset("retrieval-sfm-30k", str(tmp_path), split="train")


def test_sfm_missing_file_names_file_and_command(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset("retrieval-sfm-120k", str(tmp_path))
  _assert_download_hint(e.value, "retrieval-sfm-120k", tmp_path,
                        tmp_path / "train" / "retrieval-SfM-120k" / "retrieval-SfM-120k.pkl")
  _fake_sfm(tmp_path)
  os.rmdir(tmp_path / "train" / "retrieval-SfM-120k" / "ims")
  with pytest.raises(datasets.DatasetNotFoundError, match="image folder"):
    datasets.get_dataset("retrieval-sfm-120k", str(tmp_path))


def test_sfm_bad_pair_index_rejected(tmp_path):
  _fake_sfm(tmp_path)
  _dump(tmp_path / "train" / "retrieval-SfM-120k" / "retrieval-SfM-120k.pkl",
        {"train": {"cids": CIDS, "cluster": [0] * 4, "qidxs": [0], "pidxs": [9]}})
  with pytest.raises(ValueError, match="out of range"):
    datasets.get_dataset("retrieval-sfm-120k", str(tmp_path))


class _Evil:

  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_pickles_cannot_run_code(tmp_path):
  _dump(tmp_path / "test" / "roxford5k" / "gnd_roxford5k.pkl", {"imlist": _Evil()})
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    datasets.get_dataset("roxford5k", str(tmp_path), check_images=False)


def test_safe_pickle_reads_numpy_arrays(tmp_path):
  p = tmp_path / "a.pkl"
  _dump(p, {"ok": np.arange(5), "bbx": np.array([1.5, 2.0, 3.0, 4.0])})
  out = datasets.safe_load_pickle(str(p))
  np.testing.assert_array_equal(out["ok"], np.arange(5))


# --------------------------------------------------------------------- Oxford / Paris


def _fake_revisited(root: Path, name="roxford5k"):
  gnd = [{"bbx": [1.5, 2.0, 30.0, 40.5], "easy": [0, 2], "hard": [1], "junk": [3]},
         {"bbx": [0, 0, 10, 10], "easy": [], "hard": [4], "junk": []}]
  cfg = {"imlist": ["a_1", "a_2", "b_1", "b_2", "c_1"], "qimlist": ["q_1", "q_2"],
         "gnd": gnd}
  _dump(root / "test" / name / f"gnd_{name}.pkl", cfg)
  (root / "test" / name / "jpg").mkdir()


def test_fake_revisited(tmp_path):
  _fake_revisited(tmp_path)
  rs = datasets.get_dataset("roxford5k", str(tmp_path))
  jpg = tmp_path / "test" / "roxford5k" / "jpg"
  assert rs.query_images == [str(jpg / "q_1.jpg"), str(jpg / "q_2.jpg")]
  assert rs.db_images[2] == str(jpg / "b_1.jpg")
  assert rs.query_bbx == [(1.5, 2.0, 30.0, 40.5), (0.0, 0.0, 10.0, 10.0)]
  np.testing.assert_array_equal(rs.gnd[0]["easy"], [0, 2])
  np.testing.assert_array_equal(rs.gnd[1]["hard"], [4])
  assert rs.gnd[1]["easy"].dtype == np.int64 and len(rs.gnd[1]["easy"]) == 0


def test_revisited_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset("rparis6k", str(tmp_path))
  _assert_download_hint(e.value, "rparis6k", tmp_path,
                        tmp_path / "test" / "rparis6k" / "gnd_rparis6k.pkl")
  _fake_revisited(tmp_path)
  os.rmdir(tmp_path / "test" / "roxford5k" / "jpg")
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset("roxford5k", str(tmp_path))
  _assert_download_hint(e.value, "roxford5k", tmp_path, tmp_path / "test" / "roxford5k" / "jpg")
  # Ground truth alone (no images) loads with check_images=False.
  assert len(datasets.get_dataset("roxford5k", str(tmp_path), check_images=False).gnd) == 2


def test_plus_1m_distractors(tmp_path):
  _fake_revisited(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset("roxford5k+1m", str(tmp_path))
  _assert_download_hint(e.value, "revisitop1m", tmp_path)
  lst = tmp_path / "test" / "revisitop1m" / "revisitop1m.txt"
  lst.parent.mkdir(parents=True)
  lst.write_text("1/2/x.jpg\n3/4/y.jpg\n\n")
  rs = datasets.get_dataset("roxford5k+1m", str(tmp_path))
  assert len(rs.db_images) == 7
  assert rs.db_images[5] == str(tmp_path / "test" / "revisitop1m" / "jpg" / "1" / "2" / "x.jpg")
  np.testing.assert_array_equal(rs.gnd[0]["easy"], [0, 2])
  d = datasets.get_dataset("revisitop1m", str(tmp_path))
  assert d.query_images == [] and len(d.db_images) == 2


def test_fake_old_oxford_pickle(tmp_path):
  cfg = {"imlist": ["x", "y", "z"], "qimlist": ["x"],
         "gnd": [{"bbx": np.array([1.0, 2.0, 3.0, 4.0]), "ok": [0, 2], "junk": [1]}]}
  _dump(tmp_path / "test" / "oxford5k" / "gnd_oxford5k.pkl", cfg)
  (tmp_path / "test" / "oxford5k" / "jpg").mkdir()
  rs = datasets.get_dataset("oxford5k", str(tmp_path))
  np.testing.assert_array_equal(rs.gnd[0]["ok"], [0, 2])
  np.testing.assert_array_equal(rs.gnd[0]["junk"], [1])
  assert rs.query_bbx[0] == (1.0, 2.0, 3.0, 4.0)


def _link_real_gnd(tmp_path, name):
  src = SHARED / "revisited" / f"gnd_{name}.pkl"
  if not src.exists():
    pytest.skip("../shared/data not available")
  d = tmp_path / "test" / name
  (d / "jpg").mkdir(parents=True)
  (d / f"gnd_{name}.pkl").symlink_to(src)
  with open(src, "rb") as f:
    return pickle.load(f)


def test_real_roxford5k_ground_truth(tmp_path):
  ref = _link_real_gnd(tmp_path, "roxford5k")
  rs = datasets.get_dataset("roxford5k", str(tmp_path))
  assert len(rs.query_images) == 70 and len(rs.db_images) == 4993
  jpg = tmp_path / "test" / "roxford5k" / "jpg"
  assert rs.query_images[0] == str(jpg / "all_souls_000013.jpg")
  assert rs.db_images[0] == str(jpg / (ref["imlist"][0] + ".jpg"))
  assert rs.query_bbx[0] == pytest.approx((136.5, 34.1, 648.5, 955.7))
  for i in (0, 33, 69):
    for key in ("easy", "hard", "junk"):
      np.testing.assert_array_equal(rs.gnd[i][key], ref["gnd"][i][key])
  # Queries are not in the database (Revisited protocol).
  assert not set(rs.query_images) & set(rs.db_images)


def test_real_rparis6k_ground_truth(tmp_path):
  _link_real_gnd(tmp_path, "rparis6k")
  rs = datasets.get_dataset("rparis6k", str(tmp_path))
  assert len(rs.query_images) == 70 and len(rs.db_images) == 6322
  assert rs.query_bbx[0] == pytest.approx((130, 17, 843, 732))


@pytest.mark.parametrize("name,gt,first_query", [
    ("oxford5k", "oxford5k_gt", "all_souls_000013"),
    ("paris6k", "paris6k_gt", "paris_defense_000605"),
])
def test_real_original_text_ground_truth(tmp_path, name, gt, first_query):
  gt_dir = SHARED / gt
  if not gt_dir.exists():
    pytest.skip("../shared/data not available")
  names = set()
  for f in gt_dir.glob("*.txt"):
    for line in f.read_text().splitlines():
      if line.strip():
        names.add(line.split()[0].replace("oxc1_", ""))
  names |= {"zz_distractor_1", "zz_distractor_2"}
  jpg = tmp_path / "test" / name / "jpg"
  jpg.mkdir(parents=True)
  for n in names:
    _touch(jpg / f"{n}.jpg")
  rs = datasets.get_dataset(name, str(tmp_path), gt_dir=str(gt_dir))
  assert len(rs.query_images) == 55
  assert len(rs.db_images) == len(names)
  assert rs.query_images[0] == str(jpg / f"{first_query}.jpg")
  stem = sorted(gt_dir.glob("*_1_query.txt"))[0].name[:-len("_query.txt")]
  good = set((gt_dir / f"{stem}_good.txt").read_text().split())
  ok = set((gt_dir / f"{stem}_ok.txt").read_text().split())
  junk = set((gt_dir / f"{stem}_junk.txt").read_text().split())
  got_ok = {Path(rs.db_images[i]).stem for i in rs.gnd[0]["ok"]}
  got_junk = {Path(rs.db_images[i]).stem for i in rs.gnd[0]["junk"]}
  assert got_ok == good | ok and got_junk == junk
  q = (gt_dir / f"{stem}_query.txt").read_text().split()
  assert rs.query_bbx[0] == pytest.approx(tuple(float(v) for v in q[1:5]))


# ------------------------------------------------------------------------------ Holidays


def test_fake_holidays(tmp_path):
  jpg = tmp_path / "test" / "holidays" / "jpg"
  for n in ("100000", "100001", "100100", "100101", "100102", "149900"):
    _touch(jpg / f"{n}.jpg")
  _touch(jpg / "readme.txt")
  rot = tmp_path / "rot.txt"
  rot.write_text("# name degrees\n100101.jpg 90\n100000.jpg 0\n")
  rs = datasets.get_dataset("holidays", str(tmp_path), rotation_list=str(rot))
  assert [Path(q).name for q in rs.query_images] == ["100000.jpg", "100100.jpg",
                                                     "149900.jpg"]
  assert len(rs.db_images) == 6
  np.testing.assert_array_equal(rs.gnd[0]["ok"], [1])
  np.testing.assert_array_equal(rs.gnd[0]["junk"], [0])  # the query itself
  np.testing.assert_array_equal(rs.gnd[1]["ok"], [3, 4])
  np.testing.assert_array_equal(rs.gnd[1]["junk"], [2])
  assert len(rs.gnd[2]["ok"]) == 0
  np.testing.assert_array_equal(rs.query_labels, [1000, 1001, 1499])
  assert rs.rotations == {str(jpg / "100101.jpg"): 90}
  bad = tmp_path / "bad.txt"
  bad.write_text("999999.jpg 90\n")
  with pytest.raises(ValueError, match="not in"):
    datasets.get_dataset("holidays", str(tmp_path), rotation_list=str(bad))


def test_holidays_missing(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset("holidays", str(tmp_path))
  _assert_download_hint(e.value, "holidays", tmp_path, tmp_path / "test" / "holidays" / "jpg")


# ------------------------------------------------------------------------------ UKBench


def test_real_ukbench_subset(tmp_path):
  src = SHARED / "ukbench_subset"
  if not src.exists():
    pytest.skip("../shared/data not available")
  (tmp_path / "test" / "ukbench").mkdir(parents=True)
  (tmp_path / "test" / "ukbench" / "full").symlink_to(src)
  rs = datasets.get_dataset("ukbench", str(tmp_path))
  assert len(rs.db_images) == 56 and len(rs.query_images) == 56
  assert len(np.unique(rs.db_labels)) == 14
  assert Path(rs.db_images[5]).name == "ukbench00005.jpg"
  np.testing.assert_array_equal(rs.gnd[5]["ok"], [4, 5, 6, 7])
  np.testing.assert_array_equal(rs.query_labels[:8], [0, 0, 0, 0, 1, 1, 1, 1])
  from retrieval_jax.data import image_io  # the real JPEGs decode
  assert image_io.load_rgb(rs.db_images[0]).shape == (480, 640, 3)


def test_fake_ukbench_incomplete_group(tmp_path):
  d = tmp_path / "test" / "ukbench"
  for i in (0, 1, 2, 3, 4, 5):
    _touch(d / f"ukbench{i:05d}.jpg")
  with pytest.raises(ValueError, match="do not have 4"):
    datasets.get_dataset("ukbench", str(tmp_path))
  rs = datasets.get_dataset("ukbench", str(tmp_path), allow_incomplete=True)
  np.testing.assert_array_equal(rs.db_labels, [0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(rs.gnd[4]["ok"], [4, 5])


def test_ukbench_missing(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset("ukbench", str(tmp_path))
  _assert_download_hint(e.value, "ukbench", tmp_path)


# ------------------------------------------------------------------------------ GLDv2


def _fake_gldv2(root: Path):
  d = root / "gldv2"
  d.mkdir(parents=True)
  (d / "train.csv").write_text(
      "id,url,landmark_id\n"
      "0123456789abcdef,\"http://x/a,b.jpg\",138982\n"
      "1123456789abcdef,http://x/b.jpg,5\n"
      "2123456789abcdef,http://x/c.jpg,138982\n")
  (d / "train_clean.csv").write_text(
      "landmark_id,images\n5,1123456789abcdef\n138982,0123456789abcdef 2123456789abcdef\n")
  (d / "index.csv").write_text(
      "id\nfedcba9876543200\nfedcba9876543210\nfedcba9876543220\nfedcba9876543230\n")
  (d / "retrieval_solution_v2.1.csv").write_text(
      "id,images,Usage\n"
      "0123456789abcdef,None,Ignored\n"
      "0223456789abcdef,fedcba9876543210 fedcba9876543200,Public\n"
      "0323456789abcdef,fedcba9876543200,Private\n"
      "0423456789abcdef,fedcba9876543220,Private\n")


def test_fake_gldv2_train(tmp_path):
  _fake_gldv2(tmp_path)
  ts = datasets.get_dataset("gldv2", str(tmp_path))
  assert len(ts.images) == 3
  assert ts.images[0] == str(tmp_path / "gldv2" / "train" / "0" / "1" / "2" /
                             "0123456789abcdef.jpg")
  assert list(ts.images)[2].endswith("2/1/2/2123456789abcdef.jpg")
  np.testing.assert_array_equal(ts.label_ids, [5, 138982])
  np.testing.assert_array_equal(ts.labels, [1, 0, 1])
  assert ts.num_classes == 2
  clean = datasets.get_dataset("gldv2", str(tmp_path), split="train_clean")
  assert [Path(p).stem for p in clean.images] == [
      "1123456789abcdef", "0123456789abcdef", "2123456789abcdef"]
  np.testing.assert_array_equal(clean.labels, [0, 1, 1])


def test_fake_gldv2_retrieval(tmp_path):
  _fake_gldv2(tmp_path)
  rs = datasets.get_dataset("gldv2", str(tmp_path), split="test")
  assert [Path(q).stem for q in rs.query_images] == [
      "0223456789abcdef", "0323456789abcdef", "0423456789abcdef"]
  assert rs.query_images[0] == str(tmp_path / "gldv2" / "test" / "0" / "2" / "2" /
                                   "0223456789abcdef.jpg")
  assert len(rs.db_images) == 4
  assert rs.db_images[1] == str(tmp_path / "gldv2" / "index" / "f" / "e" / "d" /
                                "fedcba9876543210.jpg")
  np.testing.assert_array_equal(rs.gnd[0]["ok"], [0, 1])
  np.testing.assert_array_equal(rs.gnd[2]["ok"], [2])
  assert [g["usage"] for g in rs.gnd] == ["Public", "Private", "Private"]
  priv = datasets.get_dataset("gldv2", str(tmp_path), split="test", subset="private")
  assert len(priv.query_images) == 2


def test_gldv2_solution_reader_matches_delf(tmp_path):
  _fake_gldv2(tmp_path)
  pub, priv, ign = gldv2.read_retrieval_solution(
      str(tmp_path / "gldv2" / "retrieval_solution_v2.1.csv"))
  assert pub == {"0223456789abcdef": ["fedcba9876543210", "fedcba9876543200"]}
  assert priv == {"0323456789abcdef": ["fedcba9876543200"],
                  "0423456789abcdef": ["fedcba9876543220"]}
  assert ign == ["0123456789abcdef"]


def test_gldv2_errors(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset("gldv2", str(tmp_path))
  _assert_download_hint(e.value, "gldv2", tmp_path, tmp_path / "gldv2" / "train.csv")
  _fake_gldv2(tmp_path)
  (tmp_path / "gldv2" / "index.csv").write_text("id\nfedcba9876543200\n")
  with pytest.raises(ValueError, match="absent"):
    datasets.get_dataset("gldv2", str(tmp_path), split="test")
