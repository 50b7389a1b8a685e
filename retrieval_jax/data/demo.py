"""The embedded demo set: instance retrieval built from photographs shipped inside pip packages.

Sources are real photographs from scikit-image (`skimage.data`) and the `mvtb-data` package.

* Synthetic landmarks: a disjoint tile of one photograph, given many views by random crop,
  scale, perspective, rotation, colour change and JPEG compression. They are split into
  training, validation ('val') and test landmarks ('test': one query, the other views the
  database), so the evaluation measures generalisation to unseen objects, as SfM-120k ->
  Oxford does.
* Real multi-view groups: several different photographs of one place or object (the campus
  walk, stereo pairs, two shots of the Eiffel tower, a toy house from three sides, ...). None
  of them is trained on: they are the "real views" splits, 'real' (test) and 'val_real' (for
  choosing a recipe), where every photo is a query against the split's other photos. They
  measure what synthetic warps cannot: whether fine-tuning keeps the network's off-the-shelf
  ability on real viewpoint and lighting changes of unseen places (issue 22).

Everything is deterministic given `seed`, and cached on disk: `build(root, seed)` writes
`root/demo-<seed>/{images/*.jpg, meta.json}` once.
"""
import glob
import hashlib
import io
import json
import os
from typing import Dict, List, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image, ImageEnhance

from retrieval_jax import sharding
from retrieval_jax import storage
from retrieval_jax.data import datasets

VIEW_LONG_SIDE = 192
_SOURCE_LONG_SIDE = 640
_FORMAT_VERSION = 3

# Real multi-view groups in mvtb-data: different photographs of the same place or object.
# Every file of one place is in its group, and none is among the single photos below: the
# real splits share no place with training.
_MVTB_GROUPS = (("eiffel-1.png", "eiffel-2.png"), ("rocks2-l.png", "rocks2-r.png"),
                ("walls-l.png", "walls-r.png"),
                ("building2-1.png", "building2-2.png", "building2-3.png"),
                ("castle.png", "castle2.png"),
                ("seq/im.001.png", "seq/im.005.png", "seq/im.009.png"),  # a toy house
                ("tomato_124.png", "tomato_14.png", "tomato_35.png", "tomato_54.png"),
                ("mosaic/aerial-08.png", "mosaic/aerial-09.png", "mosaic/aerial-10.png",
                 "mosaic/aerialphoto.png"))  # one airport from the air
# The campus walk: three consecutive frames per place.
_CAMPUS_FRAMES_PER_PLACE = 3
# scikit-image's stereo pair (left, right).
_SKIMAGE_GROUPS = ("stereo_motorcycle",)
# Single photographs (mvtb-data), tiled into several synthetic landmarks when large. Left
# out: church.jpg (church.png again), flowers1/8 (perhaps one tulip bed), aerial2-* (the
# airport of the aerial group), drawings, targets and binary images.
_MVTB_SINGLES = ("church.png", "lab-scene.png", "parks.png", "roof.png", "street.png",
                 "road.png", "notre-dame.png", "adelson.png", "58060.png", "butterfly.jpg",
                 "image3.jpg", "penguins.png", "greenscreen.png", "monalisa.png", "tags.png",
                 "flowers2.png", "flowers3.png", "flowers4.png", "flowers5.png",
                 "flowers6.png", "flowers7.png", "flowers9.png")
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                   "hubble_deep_field", "retina", "camera", "coins", "page")
# The training / val / test split of the synthetic landmarks, and the val_real share of
# the real groups.
_TEST_FRACTION = 0.3
_VAL_FRACTION = 0.15
_VAL_REAL_FRACTION = 1 / 3


def _mvtb_dir() -> str:
  try:
    import mvtbdata  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the demo set needs the `mvtb-data` package: pip install mvtb-data") from e
  return os.path.join(os.path.dirname(mvtbdata.__file__), "images")


def _to_rgb_small(im: Image.Image) -> np.ndarray:
  im = im.convert("RGB")
  scale = _SOURCE_LONG_SIDE / max(im.size)
  if scale < 1:
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.BILINEAR)
  return np.asarray(im)


def _tiles(image: np.ndarray) -> List[np.ndarray]:
  """Disjoint tiles of a photograph: 2x2 when both sides are large, 2 halves when one is."""
  h, w = image.shape[:2]
  if h >= 400 and w >= 400:
    return [image[i * h // 2:(i + 1) * h // 2, j * w // 2:(j + 1) * w // 2]
            for i in range(2) for j in range(2)]
  if max(h, w) >= 400:
    if w >= h:
      return [image[:, :w // 2], image[:, w // 2:]]
    return [image[:h // 2], image[h // 2:]]
  return [image]


def _skimage():
  try:
    from skimage import data as skdata  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the demo set needs scikit-image: pip install scikit-image") from e
  return skdata


def real_groups() -> List[Tuple[str, List[np.ndarray]]]:
  """[(place name, [its real photographs])]: the multi-view groups, in a fixed order."""
  root = _mvtb_dir()
  out = []
  for group in _MVTB_GROUPS:
    photos = [_to_rgb_small(Image.open(os.path.join(root, f))) for f in group]
    out.append(("mvtb:" + "+".join(group), photos))
  campus = sorted(glob.glob(os.path.join(root, "campus", "*.png")))
  n = _CAMPUS_FRAMES_PER_PLACE
  for i in range(0, len(campus) - n + 1, n):
    out.append(("mvtb:campus" + str(i), [_to_rgb_small(Image.open(f))
                                         for f in campus[i:i + n]]))
  skdata = _skimage()
  for name in _SKIMAGE_GROUPS:
    left, right = getattr(skdata, name)()[:2]
    out.append((f"skimage:{name}", [_to_rgb_small(Image.fromarray(left)),
                                    _to_rgb_small(Image.fromarray(right))]))
  return out


def source_landmarks() -> List[Tuple[str, List[np.ndarray]]]:
  """[(landmark name, [its one source tile])]: the synthetic landmarks, in a fixed order."""
  root = _mvtb_dir()
  out = []
  for f in _MVTB_SINGLES:
    for t, tile in enumerate(_tiles(_to_rgb_small(Image.open(os.path.join(root, f))))):
      out.append((f"mvtb:{f}#{t}", [tile]))
  skdata = _skimage()
  for name in _SKIMAGE_PHOTOS:
    photo = _to_rgb_small(Image.fromarray(getattr(skdata, name)()))
    for t, tile in enumerate(_tiles(photo)):
      out.append((f"skimage:{name}#{t}", [tile]))
  return out


def _perspective_coeffs(src, dst):
  """PIL PERSPECTIVE coefficients mapping output corners `dst` to input corners `src`."""
  a = []
  for (x, y), (u, v) in zip(dst, src):
    a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
    a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
  return np.linalg.solve(np.asarray(a, float), np.asarray(src, float).reshape(8))


def random_view(photo: np.ndarray, rng: np.random.Generator, long_side: int = VIEW_LONG_SIDE,
                strength: float = 1.0) -> bytes:
  """One synthetic view of `photo` as JPEG bytes: crop, perspective, rotation, colour, JPEG."""
  h, w = photo.shape[:2]
  # Crop keeping 45-90% of the area (a different part of the landmark each time).
  frac = rng.uniform(0.45, 0.9)
  aspect = np.exp(rng.uniform(-0.3, 0.3))
  cw = int(min(w, np.sqrt(frac * h * w * aspect)))
  ch = int(min(h, np.sqrt(frac * h * w / aspect)))
  x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
  im = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw])
  # Perspective: move each corner by up to 12% of the side.
  j = 0.12 * strength
  dst = [(0, 0), (cw, 0), (cw, ch), (0, ch)]
  src = [(x + rng.uniform(-j, j) * cw, y + rng.uniform(-j, j) * ch) for x, y in dst]
  im = im.transform((cw, ch), Image.PERSPECTIVE, tuple(_perspective_coeffs(src, dst)),
                    Image.BILINEAR)
  im = im.rotate(rng.uniform(-15, 15) * strength, Image.BILINEAR, expand=False)
  for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
    im = enhance(im).enhance(rng.uniform(1 - 0.35 * strength, 1 + 0.35 * strength))
  scale = long_side / max(im.size)
  im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                 Image.BILINEAR)
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=int(rng.integers(40, 95)))
  return buf.getvalue()


def build(root: str, seed: int = 0, views_train: int = 10, views_test: int = 8) -> str:
  """Builds (once) the demo set under `root/demo-<seed>`; returns that folder.

  Validation and test landmarks give one query and `views_test - 1` database views each.
  On several processes (every one calls it), process 0 builds the set while the others
  wait at a barrier with a timeout: one writer per file, in a folder all of them must see.
  """
  out = storage.join(root, f"demo-{seed}")
  key = dict(version=_FORMAT_VERSION, seed=seed, views_train=views_train,
             views_test=views_test)
  if sharding.jax.process_count() <= 1:
    return _build(out, key, seed, views_train, views_test)
  if sharding.is_main_process():
    _build(out, key, seed, views_train, views_test)
  sharding.sync("demo_build", timeout_s=sharding.WRITE_TIMEOUT_S)
  if not _is_built(out, key):
    raise datasets.DatasetNotFoundError(
        f"process {sharding.jax.process_index()} does not see the demo set that process 0 "
        f"built in {out}: on several hosts data.root must be a folder they share")
  return out


def _is_built(out: str, key: Dict) -> bool:
  meta_path = storage.join(out, "meta.json")
  if not storage.exists(meta_path):
    return False
  return json.loads(storage.read_text(meta_path)).get("key") == key


def _jpeg(photo: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(photo).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _build(out: str, key: Dict, seed: int, views_train: int, views_test: int) -> str:
  """Writes the demo set into `out` unless it is there already."""
  meta_path = storage.join(out, "meta.json")
  if _is_built(out, key):
    return out
  logging.info("Building the demo set in %s (once; cached) ...", out)
  storage.makedirs(storage.join(out, "images"))
  landmarks = source_landmarks()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(landmarks))
  n_test = int(round(_TEST_FRACTION * len(landmarks)))
  n_val = int(round(_VAL_FRACTION * len(landmarks)))
  split_of = {int(lid): ("test" if r < n_test else "val" if r < n_test + n_val else "train")
              for r, lid in enumerate(order)}
  meta: Dict[str, list] = {"landmarks": [], "real_groups": []}
  for split in ("train", "val", "test", "real", "val_real"):
    meta[f"{split}_images"], meta[f"{split}_labels"] = [], []
  for split in ("val", "test"):
    meta[f"{split}_query_images"], meta[f"{split}_query_labels"] = [], []
  for lid, (name, photos) in enumerate(landmarks):
    meta["landmarks"].append(name)
    split = split_of[lid]
    view_rng = np.random.default_rng([seed, lid])
    for v in range(views_train if split == "train" else views_test):
      rel = f"images/{lid:03d}_{v:02d}.jpg"
      storage.write_bytes(storage.join(out, rel),  # a local folder or a bucket
                          random_view(photos[v % len(photos)], view_rng))
      if split == "train":
        meta["train_images"].append(rel)
        meta["train_labels"].append(lid)
      else:
        part = f"{split}_query" if v == 0 else split
        meta[f"{part}_images"].append(rel)
        meta[f"{part}_labels"].append(lid)
  # The real groups: the photographs themselves (no warp), split by their own permutation.
  groups = real_groups()
  order = np.random.default_rng([seed, 1]).permutation(len(groups))
  n_val_real = int(round(_VAL_REAL_FRACTION * len(groups)))
  for r, gid in enumerate(order.tolist()):
    name, photos = groups[gid]
    split = "val_real" if r < n_val_real else "real"
    for p, photo in enumerate(photos):
      rel = f"images/real_{gid:02d}_{p}.jpg"
      storage.write_bytes(storage.join(out, rel), _jpeg(photo))
      meta[f"{split}_images"].append(rel)
      meta[f"{split}_labels"].append(gid)
  meta["real_groups"] = [name for name, _ in groups]
  # Last, and whole (renamed into place locally): the cache is valid only once complete.
  storage.write_bytes(meta_path, json.dumps({"key": key, **meta}).encode())
  return out


def fingerprint(folder: str) -> str:
  """SHA-256 over the built files, to check determinism."""
  h = hashlib.sha256()
  for p in sorted(glob.glob(os.path.join(folder, "images", "*.jpg"))):
    with open(p, "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def _load_meta(root: str, seed: int):
  folder = build(root, seed)
  return folder, json.loads(storage.read_text(storage.join(folder, "meta.json")))


def _paths(folder: str, rels: Sequence[str]) -> List[str]:
  return [storage.join(folder, r) for r in rels]


SPLITS = ("train", "val", "test", "val_real", "real")


@datasets.register("demo", splits=SPLITS)
def load(root: str, split: str = "train", seed: int = 0):
  """One split of the demo set.

  'train' -> TrainSet of the training landmarks (labels: landmark ids, as in 'val' and
  'test', below `len(meta["landmarks"])`); 'val' / 'test' ->
  RetrievalSet of held-out synthetic landmarks (one query each, the other views the
  database, same-label ground truth); 'val_real' / 'real' -> RetrievalSet "demo_real" of
  real multi-view groups: every photo a query against all the split's photos, the other
  photos of its place positive, itself junk.
  """
  datasets.check_split("demo", split, SPLITS)
  folder, meta = _load_meta(root, seed)
  if split == "train":
    return datasets.TrainSet("demo", _paths(folder, meta["train_images"]),
                             np.asarray(meta["train_labels"], np.int32))
  if split in ("val", "test"):
    return datasets.RetrievalSet(
        "demo", _paths(folder, meta[f"{split}_query_images"]),
        _paths(folder, meta[f"{split}_images"]),
        query_labels=np.asarray(meta[f"{split}_query_labels"], np.int32),
        db_labels=np.asarray(meta[f"{split}_labels"], np.int32))
  images = _paths(folder, meta[f"{split}_images"])
  labels = np.asarray(meta[f"{split}_labels"], np.int32)
  gnd = [{"ok": np.flatnonzero((labels == l) & (np.arange(len(labels)) != i)),
          "junk": np.asarray([i], np.int64)} for i, l in enumerate(labels)]
  # "demo_real" scores both (the evaluator of that name); val_real prints as demo_real+val.
  return datasets.RetrievalSet("demo_real" if split == "real" else "demo_real+val", images,
                               images, gnd=gnd, query_labels=labels, db_labels=labels)
