"""The embedded demo set: instance retrieval built from photographs shipped inside pip packages.

Sources are real photographs from scikit-image (`skimage.data`) and the `mvtb-data` package.
Each "landmark" is either a real multi-view group (stereo pairs, the campus walk, two photos of
the Eiffel tower, ...) or a disjoint tile of one large photograph. Every landmark gets many
views by random crop, scale, perspective, rotation, colour change and JPEG compression.
Landmarks are split into training landmarks and held-out query/database landmarks, so the
evaluation measures generalisation to unseen objects, as SfM-120k -> Oxford does.

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
_FORMAT_VERSION = 1

# Real multi-view groups in mvtb-data: several photographs of the same place.
_MVTB_GROUPS = (("eiffel-1.png", "eiffel-2.png"), ("rocks2-l.png", "rocks2-r.png"),
                ("walls-l.png", "walls-r.png"),
                ("building2-1.png", "building2-2.png", "building2-3.png"),
                ("castle.png", "castle2.png"))
# Single photographs (mvtb-data), tiled into several landmarks when large.
_MVTB_SINGLES = ("church.png", "lab-scene.png", "parks.png", "roof.png", "street.png",
                 "road.png", "notre-dame.png", "adelson.png", "58060.png", "butterfly.jpg",
                 "image3.jpg", "penguins.png", "greenscreen.png", "tomato_54.png",
                 "monalisa.png", "tags.png", "mosaic/aerialphoto.png")
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                   "hubble_deep_field", "retina", "camera", "coins", "page")


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


def source_landmarks() -> List[Tuple[str, List[np.ndarray]]]:
  """[(landmark name, [source photos])] from the packaged photographs, in a fixed order."""
  try:
    from skimage import data as skdata  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the demo set needs scikit-image: pip install scikit-image") from e
  root = _mvtb_dir()
  out = []
  for group in _MVTB_GROUPS:
    photos = [_to_rgb_small(Image.open(os.path.join(root, f))) for f in group]
    out.append(("mvtb:" + "+".join(group), photos))
  campus = sorted(glob.glob(os.path.join(root, "campus", "*.png")))
  for i in range(0, len(campus) - 2, 3):  # A walk: three consecutive frames per place.
    frames = campus[i:i + 3]
    out.append(("mvtb:campus" + str(i), [_to_rgb_small(Image.open(f)) for f in frames]))
  for f in _MVTB_SINGLES:
    for t, tile in enumerate(_tiles(_to_rgb_small(Image.open(os.path.join(root, f))))):
      out.append((f"mvtb:{f}#{t}", [tile]))
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


def build(root: str, seed: int = 0, views_train: int = 10, views_test: int = 8,
          test_fraction: float = 0.3) -> str:
  """Builds (once) the demo set under `root/demo-<seed>`; returns that folder.

  Held-out landmarks give one query and `views_test - 1` database views each. On several
  processes (every one calls it), process 0 builds the set while the others wait at a
  barrier with a timeout: one writer per file, in a folder all of them must see.
  """
  out = storage.join(root, f"demo-{seed}")
  key = dict(version=_FORMAT_VERSION, seed=seed, views_train=views_train,
             views_test=views_test, test_fraction=test_fraction)
  if sharding.jax.process_count() <= 1:
    return _build(out, key, seed, views_train, views_test, test_fraction)
  if sharding.is_main_process():
    _build(out, key, seed, views_train, views_test, test_fraction)
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


def _build(out: str, key: Dict, seed: int, views_train: int, views_test: int,
           test_fraction: float) -> str:
  """Writes the demo set into `out` unless it is there already."""
  meta_path = storage.join(out, "meta.json")
  if _is_built(out, key):
    return out
  logging.info("Building the demo set in %s (once; cached) ...", out)
  storage.makedirs(storage.join(out, "images"))
  landmarks = source_landmarks()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(landmarks))
  n_test = int(round(test_fraction * len(landmarks)))
  test_ids = set(order[:n_test].tolist())
  meta: Dict[str, list] = {k: [] for k in ("train_images", "train_labels", "query_images",
                                           "query_labels", "db_images", "db_labels",
                                           "landmarks")}
  for lid, (name, photos) in enumerate(landmarks):
    meta["landmarks"].append(name)
    held_out = lid in test_ids
    n = views_test if held_out else views_train
    view_rng = np.random.default_rng([seed, lid])
    for v in range(n):
      photo = photos[v % len(photos)]
      jpeg = random_view(photo, view_rng)
      rel = f"images/{lid:03d}_{v:02d}.jpg"
      storage.write_bytes(storage.join(out, rel), jpeg)  # a local folder or a bucket
      if not held_out:
        split = "train"
      else:
        split = "query" if v == 0 else "db"
      meta[f"{split}_images"].append(rel)
      meta[f"{split}_labels"].append(lid)
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


@datasets.register("demo")
def load(root: str, split: str = "train", seed: int = 0):
  """'train' -> TrainSet of training landmarks; 'test' -> RetrievalSet of held-out ones."""
  folder, meta = _load_meta(root, seed)
  if split == "train":
    return datasets.TrainSet("demo", _paths(folder, meta["train_images"]),
                             np.asarray(meta["train_labels"], np.int32))
  if split == "test":
    return datasets.RetrievalSet(
        "demo", _paths(folder, meta["query_images"]), _paths(folder, meta["db_images"]),
        query_labels=np.asarray(meta["query_labels"], np.int32),
        db_labels=np.asarray(meta["db_labels"], np.int32))
  raise ValueError(f"demo: unknown split {split!r} (use 'train' or 'test')")
