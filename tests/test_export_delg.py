"""An exported DELG, called with the reference's signature in a fresh TensorFlow process,
gives `--mode=extract`'s local features and global descriptor.

A tiny random DELG (ResNet-18 layout at width 8, local head 8-d) is checkpointed into a
workdir with a tiny Revisited-Oxford layout; `--mode=extract` writes its descriptors and
local-feature stores, `--mode=export` the SavedModel. A fresh Python process that never
imports retrieval_jax (checked) loads it with `tf.saved_model.load` and calls
"serving_default" as DELF's `extractor.py` does (`input_image`, `input_scales`,
`input_max_feature_num`, `input_abs_thres`, `input_global_scales_ind` -> `boxes`,
`features`, `scales`, `scores`, `global_descriptors`):

* with each database photo as decoded (some larger than `extract.local_long_side`, one
  smaller): boxes and scales equal the extraction's exactly (boxes: `extract_keypoints`'
  records, whose centres are the store's locations, also exactly), scores and features
  to 1e-4, the global row to 1e-4;
* as a reference client does: the photo first bounded by DELG's `ResizeImage` (PIL
  BILINEAR, transcribed here), then box centres divided by its scale factors and the
  features L2-normalised (`DelfFeaturePostProcessing`), the global rows summed and
  L2-normalised: the same locations (to 1e-4 relative) and features.
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
from PIL import Image
import pytest

from configs import common
from retrieval_jax import checkpointing
from retrieval_jax import config_checks
from retrieval_jax import export
from retrieval_jax import networks
from retrieval_jax import run
from retrieval_jax.local import keypoints as kp_lib
from retrieval_jax.local import model as local_model
from retrieval_jax.local import store as store_lib
import tiny_models  # pylint: disable=g-bad-import-order

tf = pytest.importorskip("tensorflow")

LOCAL_SIDE = 96
SCALES = (0.7071, 1.0, 1.4142)
MAX_FEATURES = 12
TOL = 1e-4


def _photos():
  from skimage import data  # pylint: disable=import-outside-toplevel
  def shrink(a, f):
    im = Image.fromarray(a)
    return np.asarray(im.resize((im.width // f, im.height // f), Image.BILINEAR))
  return {"coffee": shrink(data.coffee(), 2),            # 200 x 300: bounded to 64 x 96
          "rocket": np.ascontiguousarray(np.rot90(shrink(data.rocket(), 3))),  # portrait
          "astronaut": data.astronaut()[100:170, 180:260],  # 70 x 80: within the bound
          "chelsea": shrink(data.chelsea(), 3)}


def _config(root):
  c = common.base_config()
  c.model.backbone = "resnet18"
  c.model.backbone_kwargs = dict(tiny_models.TINY_KWARGS, bn_mode="frozen_stats")
  c.model.local_head = "delg"
  c.model.local_dim = 8
  c.model.local_attention_hidden = 8
  c.model.local_num_classes = 4
  c.data.image_size = 64
  c.extract.long_side = 64
  c.extract.scales = (1.0, 2 ** -0.5)
  c.extract.local_long_side = LOCAL_SIDE
  c.extract.local_scales = SCALES
  c.extract.local_max_features = MAX_FEATURES
  c.eval.dataset = "roxford5k"
  c.eval.root = root
  c.export.platforms = ("cpu",)
  return c


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  folder = root / "test" / "roxford5k"
  (folder / "jpg").mkdir(parents=True)
  photos = _photos()
  db = ["coffee", "rocket", "astronaut"]
  for name in photos:
    Image.fromarray(photos[name]).save(folder / "jpg" / f"{name}.jpg", quality=90)
  h, w = photos["chelsea"].shape[:2]
  with open(folder / "gnd_roxford5k.pkl", "wb") as f:
    pickle.dump({"gnd": [{"bbx": [w * 0.1, h * 0.1, w * 0.9, h * 0.9], "easy": [0],
                          "hard": [], "junk": []}],
                 "imlist": db, "qimlist": ["chelsea"]}, f)
  config = _config(str(root))
  model = networks.build_network(config.model)
  variables = tiny_models.random_variables(model, p=2.5)
  # The attention threshold: the median score of one photo at scale 1 under this random
  # network (so that it drops positions); a test parameter, no evaluation is involved.
  out = jax.jit(model.apply)(variables, photos["coffee"][None, :64, :96])
  config.extract.local_score_threshold = float(np.median(np.asarray(out["attention"])))
  workdir = tmp_path_factory.mktemp("work")
  mgr = checkpointing.manager(str(workdir))
  checkpointing.save(mgr, 1, {k: variables[k] for k in ("params", "batch_stats")})
  mgr.wait_until_finished()
  extracted = run.run("extract", config, str(workdir))
  exported = run.run("export", config, str(workdir))
  paths = [str(folder / "jpg" / f"{n}.jpg") for n in db]
  return dict(config=config, model=model, variables=variables, paths=paths,
              extracted=extracted, export_dir=exported["export_dir"], workdir=workdir)


_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from PIL import Image
    import tensorflow as tf
    folder, paths, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[4]
    args = json.loads(sys.argv[3])
    serve = tf.saved_model.load(folder).signatures["serving_default"]

    def call(image):
      got = serve(input_image=tf.constant(image),
                  input_scales=tf.constant(args["scales"], tf.float32),
                  input_max_feature_num=tf.constant(args["max_features"], tf.int32),
                  input_abs_thres=tf.constant(args["threshold"], tf.float32),
                  input_global_scales_ind=tf.constant([0, 1, 2], tf.int32))
      return {k: v.numpy() for k, v in got.items()}

    def resize_image(image, max_image_size):
      # examples/extractor.py: ResizeImage (min_image_size -1, no square output).
      height, width = image.shape[:2]
      largest_side = max(width, height)
      if max_image_size >= 0 and largest_side > max_image_size:
        scale_factor = max_image_size / largest_side
      else:
        return image, np.ones(2, dtype=float)
      new_shape = (int(round(width * scale_factor)), int(round(height * scale_factor)))
      scale_factors = np.array([new_shape[1] / height, new_shape[0] / width], dtype=float)
      resized = np.array(Image.fromarray(image).resize(new_shape, resample=Image.BILINEAR))
      return resized, scale_factors

    results = {}
    for i, path in enumerate(paths):
      image = np.array(Image.open(path).convert("RGB"))
      for k, v in call(image).items():
        results[f"{i}/{k}"] = v
      # As extractor.py: the client bounds the image, then post-processes the outputs.
      resized, factors = resize_image(image, args["long_side"])
      got = call(resized)
      boxes = got["boxes"]
      results[f"{i}/client_locations"] = (boxes[:, :2] + boxes[:, 2:]) / 2.0 / factors
      f = got["features"]
      results[f"{i}/client_features"] = f / np.linalg.norm(f, axis=1, keepdims=True)
      g = got["global_descriptors"].sum(axis=0)
      results[f"{i}/client_global"] = g / np.linalg.norm(g)
    assert not any(m.startswith("retrieval_jax") for m in sys.modules), "imported the project"
    np.savez(out, **results)
""")


@pytest.fixture(scope="module")
def served(site, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("client") / "out.npz")
  c = site["config"]
  args = {"scales": list(SCALES), "max_features": MAX_FEATURES, "long_side": LOCAL_SIDE,
          "threshold": c.extract.local_score_threshold}
  proc = subprocess.run(
      [sys.executable, "-c", _CLIENT, os.path.join(site["export_dir"], "saved_model"),
       json.dumps(site["paths"]), json.dumps(args), out],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""),
      cwd=str(site["workdir"]), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(out))


@pytest.fixture(scope="module")
def records(site):
  """The extraction's records with their boxes (the store keeps their centres)."""
  c = site["config"]
  rf = local_model.local_receptive_field(site["model"])
  return dict(kp_lib.extract_keypoints(
      site["model"], site["variables"], site["paths"], rf=rf, mesh=None,
      long_side=LOCAL_SIDE, scales=SCALES, score_threshold=c.extract.local_score_threshold,
      max_features=MAX_FEATURES, batch_size=2))


def test_reference_signature_gives_the_extraction(site, served, records):
  store = store_lib.LocalFeatureStore(site["extracted"]["db_local"]["path"])
  glob = np.load(os.path.join(site["extracted"]["db"]["path"], "descriptors.npy"))
  counts = []
  for i in range(len(site["paths"])):
    want, rec = store[i], records[i]
    boxes = served[f"{i}/boxes"]
    assert boxes.dtype == np.float32 and boxes.shape == (len(want["scores"]), 4)
    np.testing.assert_array_equal(boxes, rec["boxes"])
    np.testing.assert_array_equal((boxes[:, :2] + boxes[:, 2:]) / 2.0, want["locations"])
    np.testing.assert_array_equal(served[f"{i}/scales"], want["scales"])
    assert served[f"{i}/scores"].shape == (len(want["scores"]), 1)
    np.testing.assert_allclose(served[f"{i}/scores"][:, 0], want["scores"], rtol=TOL,
                               atol=TOL)
    np.testing.assert_allclose(served[f"{i}/features"], want["descriptors"], atol=TOL)
    assert served[f"{i}/global_descriptors"].shape == (1, glob.shape[1])
    np.testing.assert_allclose(served[f"{i}/global_descriptors"][0], glob[i], atol=TOL)
    counts.append(len(want["scores"]))
  # The threshold and the cap both act: some image is cut by the threshold below the cap,
  # and some has more candidates than the cap.
  assert min(counts) < MAX_FEATURES and max(counts) == MAX_FEATURES, counts
  assert len(set(np.round(served["0/scales"], 4))) > 1  # several pyramid levels


def test_reference_client_gets_the_same_local_features(site, served):
  """A client that bounds the image itself (its `ResizeImage`) and divides by its own scale
  factors gets the store's locations and features."""
  store = store_lib.LocalFeatureStore(site["extracted"]["db_local"]["path"])
  for i in range(len(site["paths"])):
    want = store[i]
    np.testing.assert_allclose(served[f"{i}/client_locations"], want["locations"],
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(served[f"{i}/client_features"], want["descriptors"],
                               atol=TOL)
    g = served[f"{i}/client_global"]
    assert g.shape == (served[f"{i}/global_descriptors"].shape[1],)
    assert abs(np.linalg.norm(g) - 1) < 1e-5


def test_export_json_names_the_signatures(site):
  meta = json.load(open(os.path.join(site["export_dir"], export.EXPORT_JSON)))
  assert meta["serving_default"] == "delg"
  assert set(meta["signatures"]) == {"describe", "describe_batch", "delg"}
  assert meta["delg"] == {"long_side": LOCAL_SIDE, "max_scale": max(SCALES),
                          "iou_threshold": 1.0}


def test_scales_above_the_export_bound_fail_by_name(site):
  loaded = tf.saved_model.load(os.path.join(site["export_dir"], "saved_model"))
  with pytest.raises(tf.errors.InvalidArgumentError, match="input_scales"):
    loaded.signatures["delg"](
        input_image=tf.zeros([40, 50, 3], tf.uint8), input_scales=tf.constant([1.0, 2.0]),
        input_max_feature_num=tf.constant(10), input_abs_thres=tf.constant(0.0),
        input_global_scales_ind=tf.constant([0]))


def test_serving_default_choice():
  assert export.resolve_serving_default("auto", True) == "delg"
  assert export.resolve_serving_default("auto", False) == "describe"
  assert export.resolve_serving_default("describe", True) == "describe"
  with pytest.raises(ValueError, match="model.local_head"):
    export.resolve_serving_default("delg", False)
  with pytest.raises(ValueError, match="export.serving_default"):
    export.resolve_serving_default("both", True)


def test_config_checks_name_the_serving_fields():
  c = _config("")
  c.model.local_head = ""
  c.export.serving_default = "delg"
  assert any("export.serving_default='delg'" in e and "model.local_head" in e
             for e in config_checks.find_problems(c, "export"))
  c.export.serving_default = "both"
  assert any("export.serving_default" in e for e in config_checks.find_problems(c, "export"))
  c.export.serving_default = "auto"
  c.export.local_max_scale = -1.0
  assert any("export.local_max_scale" in e for e in config_checks.find_problems(c, "export"))


def test_nms_below_one_as_the_extraction(site, tmp_path):
  """`extract.local_iou` < 1: TF's non_max_suppression in the signature keeps the boxes
  `keypoints.non_max_suppression` keeps (every candidate, no cap reached)."""
  from retrieval_jax import export_delg  # pylint: disable=import-outside-toplevel
  model, variables = site["model"], site["variables"]
  export.export_model(model, variables, str(tmp_path), export.ExportOptions(long_side=64),
                      platforms=("cpu",), delg=export_delg.DelgOptions(
                          long_side=LOCAL_SIDE, max_scale=max(SCALES), iou_threshold=0.5))
  serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
  want = dict(kp_lib.extract_keypoints(
      model, variables, site["paths"], rf=local_model.local_receptive_field(model),
      mesh=None, long_side=LOCAL_SIDE, scales=SCALES, score_threshold=0.0,
      max_features=200, iou_threshold=0.5, batch_size=2))
  everything = dict(kp_lib.extract_keypoints(
      model, variables, site["paths"], rf=local_model.local_receptive_field(model),
      mesh=None, long_side=LOCAL_SIDE, scales=SCALES, score_threshold=0.0,
      max_features=200, iou_threshold=1.0, batch_size=2))
  for i, path in enumerate(site["paths"]):
    got = serve(input_image=tf.constant(np.asarray(Image.open(path).convert("RGB"))),
                input_scales=tf.constant(SCALES, tf.float32),
                input_max_feature_num=tf.constant(200),
                input_abs_thres=tf.constant(0.0), input_global_scales_ind=tf.constant([0]))
    np.testing.assert_array_equal(got["boxes"].numpy(), want[i]["boxes"])
    np.testing.assert_allclose(got["features"].numpy(), want[i]["descriptors"], atol=TOL)
    # NMS dropped some (the cap of 200 is above every image's candidates).
    assert len(want[i]["scores"]) < len(everything[i]["scores"]) < 200
