"""Exported artifacts (jax.export, TF SavedModel) give `extract`'s descriptors.

Both artifacts are loaded in a fresh Python process that never imports retrieval_jax
(checked), fed real photographs (scikit-image) of two aspect ratios decoded with PIL, and
compared with `extract.extract_descriptors` on 8 fake devices (+ cirtorch's `whitenapply`
in numpy for the whitened variants) to 1e-4; single- and multi-scale, with and without whitening.
A tiny random ResNet keeps it cheap: two exports, single-scale unwhitened and multi-scale
whitened (every artifact compiles once per input shape in the fresh process).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from PIL import Image
import pytest

from retrieval_jax import export
from retrieval_jax import extract
from retrieval_jax import multiscale
from retrieval_jax import sharding
from retrieval_jax.data import protocol
import tiny_models  # pylint: disable=g-bad-import-order

tf = pytest.importorskip("tensorflow")

LONG_SIDE = 64
SCALES = (1.0, 2 ** -0.5)
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from skimage import data  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("export")
  paths = []
  for name, array in (("coffee", data.coffee()),  # 2:3 landscape
                      ("rocket", np.ascontiguousarray(np.rot90(data.rocket()))[::2, ::2])):
    path = str(folder / f"{name}.jpg")
    Image.fromarray(array).save(path, quality=90)
    paths.append(path)
  model = tiny_models.tiny_resnet("gem")
  variables = tiny_models.random_variables(model, p=2.5, image_size=32)
  mesh = sharding.make_mesh(devices=jax.devices()[:min(8, jax.device_count())])
  describe = extract.make_describe_fn(model, mesh)
  ref = {}
  for name, case in CASES.items():
    ref[name] = np.asarray(extract.extract_descriptors(
        model, variables, paths, mesh=mesh, long_side=LONG_SIDE, scales=case["scales"],
        multiscale_p=multiscale.multiscale_p_from(variables, "gem", "gem"), describe_fn=describe,
        protocol=case["protocol"]))
  # A PCA whitening learned on random descriptors of the right dimension.
  x = np.random.RandomState(1).randn(200, ref["single"].shape[1])
  m = x.mean(axis=0)
  eigval, eigvec = np.linalg.eigh(np.cov(x, rowvar=False))
  proj = (eigvec / np.sqrt(eigval)).T[::-1]  # [D, D], leading components first
  white = {"m": m, "P": proj, "dim": 32, "kind": "pca"}
  return dict(folder=folder, paths=paths, model=model, variables=variables, ref=ref,
              white=white)


_LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from PIL import Image
    import jax
    import tensorflow as tf
    cases, paths, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    h = max(i.shape[0] for i in images); w = max(i.shape[1] for i in images)
    batch = np.zeros((len(images), h, w, 3), np.uint8); mask = np.zeros(batch.shape[:3], bool)
    for r, i in enumerate(images):
      batch[r, :i.shape[0], :i.shape[1]] = i; mask[r, :i.shape[0], :i.shape[1]] = True
    results = {}
    for name, folder in cases.items():
      with open(folder + "/jax/describe.bin", "rb") as f:
        one = jax.export.deserialize(f.read())
      with open(folder + "/jax/describe_batch.bin", "rb") as f:
        many = jax.export.deserialize(f.read())
      results[name + "/jax"] = np.stack([np.asarray(one.call(i)) for i in images])
      results[name + "/jax_batch"] = np.asarray(many.call(batch, mask))
      loaded = tf.saved_model.load(folder + "/saved_model")
      serve = loaded.signatures["serving_default"]
      results[name + "/tf"] = np.stack([serve(image=tf.constant(i))["descriptor"].numpy()
                                        for i in images])
      results[name + "/tf_batch"] = loaded.signatures["describe_batch"](
          images=tf.constant(batch), mask=tf.constant(mask))["descriptor"].numpy()
    assert not any(m.startswith("retrieval_jax") for m in sys.modules), "imported the project"
    np.savez(out, **results)
""")


# Each case: the extraction's input rule (data/protocol.py), which the export reproduces
# in the graph. LEGACY: Pillow bilinear to long_side, each scale resized from the file;
# REFERENCE (cirtorch's): Pillow LANCZOS thumbnail (never enlarged, with its reduce step),
# the other scales by F.interpolate of that input.
CASES = {
    "single": dict(scales=(1.0,), white=False, protocol=protocol.LEGACY),
    "multi_white": dict(scales=SCALES, white=True, protocol=protocol.REFERENCE),
}


@pytest.fixture(scope="module")
def exported(setup):
  folders = {}
  for name, case in CASES.items():
    options = export.options_from_protocol(
        case["protocol"], long_side=LONG_SIDE, scales=case["scales"],
        whitening=setup["white"] if case["white"] else None)
    folder = str(setup["folder"] / name)
    meta = export.export_model(setup["model"], setup["variables"], folder, options,
                               info={"case": name})
    folders[name] = (folder, meta)
  out = str(setup["folder"] / "fresh.npz")
  env = dict(os.environ, PYTHONPATH="")
  proc = subprocess.run(
      [sys.executable, "-c", _LOADER, json.dumps({k: v[0] for k, v in folders.items()}),
       json.dumps(setup["paths"]), out],
      capture_output=True, text=True, env=env, cwd=str(setup["folder"]), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return folders, dict(np.load(out))


def _expected(setup, name):
  case = CASES[name]
  ref = setup["ref"][name]
  if case["white"]:
    # cirtorch's whitenapply: P[:dim] (x - m), then x / (||x|| + 1e-6).
    w = setup["white"]
    ref = (ref.astype(np.float64) - w["m"]) @ w["P"][:w["dim"]].T
    ref = ref / (np.linalg.norm(ref, axis=1, keepdims=True) + 1e-6)
  return ref


@pytest.mark.parametrize("name", list(CASES))
def test_fresh_process_artifacts_equal_extraction(setup, exported, name):
  _, results = exported
  want = _expected(setup, name)
  for kind in ("jax", "jax_batch", "tf", "tf_batch"):
    got = results[f"{name}/{kind}"]
    assert got.shape == want.shape and got.dtype == np.float32, (kind, got.shape)
    np.testing.assert_allclose(got, want, atol=TOL, err_msg=f"{name}/{kind}")
  # The photos differ, and the options change the descriptor (no trivial equality).
  assert abs(float(want[0] @ want[1])) < 0.999


def test_options_change_the_descriptor_and_json_records_them(setup, exported):
  folders, results = exported
  assert results["single/jax"].shape[1] == 64 and results["multi_white/jax"].shape[1] == 32
  meta = json.load(open(os.path.join(folders["multi_white"][0], export.EXPORT_JSON)))
  assert meta["descriptor_dim"] == 32 and meta["scales"] == list(SCALES)
  assert meta["multiscale_p"] is not None and abs(meta["multiscale_p"] - 2.5) < 1e-6
  assert meta["whitening"] == {"dim": 32, "kind": "pca"} and meta["case"] == "multi_white"
  assert meta["backbone"] == "resnet18"
  assert (meta["resample"], meta["upscale"], meta["multiscale_resize"]) == (
      "lanczos", False, "interpolate")
  assert json.load(open(os.path.join(folders["single"][0], export.EXPORT_JSON))
                   )["descriptor_dim"] == setup["ref"]["single"].shape[1]


@pytest.mark.parametrize("resample,upscale,side", [
    ("bilinear", True, 64), ("bilinear", True, 45),  # PIL resize to the long side
    ("lanczos", False, 64), ("lanczos", False, 300),  # PIL thumbnail (the reference)
    ("bilinear", False, 45), ("lanczos", True, 300)])
def test_in_graph_resize_is_pillows(resample, upscale, side):
  """The fixed-point resize equals Pillow's, as the extraction calls it (incl. the reduce
  step of Image.thumbnail at 600 -> 64 px and its aspect rounding)."""
  from skimage import data  # pylint: disable=import-outside-toplevel
  pil_filter = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[resample]
  for image in (data.coffee(), np.ascontiguousarray(np.rot90(data.rocket()))):
    im = Image.fromarray(image)
    if upscale:  # the long side to `side`, rounded sizes, enlarging too
      scale = side / max(im.size)
      im = im.resize((round(im.width * scale), round(im.height * scale)), pil_filter)
    else:  # cirtorch's imresize
      im.thumbnail((side, side), pil_filter)
    want = np.asarray(im)
    got, mask = jax.jit(lambda x: export.resize_into_canvas(
        x, x.shape[0], x.shape[1], side, resample=resample, upscale=upscale))(image)
    nh, nw = want.shape[:2]
    assert np.asarray(mask).sum() == nh * nw and np.asarray(mask)[:nh, :nw].all()
    diff = np.abs(np.asarray(got)[:nh, :nw].astype(int) - want.astype(int))
    if resample == "bilinear" and upscale:  # Image.resize with integer weights
      assert diff.max() == 0  # (export._exact_bilinear): Pillow's exactly
    # LANCZOS: float32 filter values where Pillow uses double: a few values one grey level
    # apart.
    assert diff.max() <= 1 and (diff > 0).mean() < 5e-3
    assert not np.asarray(got)[nh:].any() and not np.asarray(got)[:, nw:].any()


def test_early_fusion_is_refused(setup):
  with pytest.raises(ValueError, match="early fusion"):
    export.make_describe_one(setup["model"], setup["variables"],
                             export.ExportOptions(multiscale_combine="early_fusion"))


def test_odd_images_through_the_exported_function(setup, exported, tmp_path):
  """The odd-image set through the exported function, loaded by the documented loader for
  real collections (`image_io.load_rgb`): the unreadable files raise a decode error naming
  them (the caller skips them), every other one gives a finite, unit-norm descriptor."""
  import odd_images  # pylint: disable=import-outside-toplevel
  from retrieval_jax.data import image_io  # pylint: disable=import-outside-toplevel
  folders, _ = exported
  with open(os.path.join(folders["single"][0], "jax", "describe.bin"), "rb") as f:
    describe = jax.export.deserialize(f.read())
  for name, path in odd_images.write(str(tmp_path)).items():
    try:
      image = image_io.load_rgb(path, max_size=1024)
    except (image_io.ImageDecodeError, FileNotFoundError) as e:
      assert name in odd_images.UNREADABLE and path in str(e), name
      continue
    assert name not in odd_images.UNREADABLE, name
    d = np.asarray(describe.call(image))
    assert np.isfinite(d).all() and abs(np.linalg.norm(d) - 1) < 1e-3, name
