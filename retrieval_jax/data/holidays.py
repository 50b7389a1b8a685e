"""INRIA Holidays (Jegou et al. 2008): 1491 images in 500 groups.

Layout: root/test/holidays/jpg/<NNNNMM>.jpg, the two official archives (jpg1.tar.gz,
jpg2.tar.gz) extracted into one `jpg/` folder. The group of an image is its name without
the last two digits; the image ending in '00.jpg' is the group's query.

Protocol: every image (queries included) is in the database; for a query, the other
images of its group are positives ('ok') and the query itself is 'junk', so it is removed
from its own ranking as in the official `holidays_map` evaluation.

Orientation: a number of Holidays photos are stored rotated with no EXIF tag (which is
why several papers use a manually "rotated" copy of the dataset). We found no
authoritative machine-readable list of them, so none is built in: pass
`rotation_list=<file>` (or put `rotations.txt` next to `jpg/`) with lines
`<image name> <clockwise degrees>`, e.g. `100501.jpg 90`; the angles end up in
`RetrievalSet.rotations` for `load_rgb(..., rotate=)`. EXIF orientation tags are applied
by `load_rgb` anyway. Alternatively point `image_dir` at an already rotated copy.
"""
import os
import re
from typing import Dict, Optional

import numpy as np

from retrieval_jax.data import datasets

SPLITS = ("test",)  # the loader's splits, declared to datasets.register

_NAME_RE = re.compile(r"^(\d+)(\d\d)\.jpg$", re.IGNORECASE)


def read_rotation_list(path: str) -> Dict[str, int]:
  """Reads `<image name> <clockwise degrees>` lines ('#' comments allowed)."""
  rotations = {}
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f"{path}:{lineno}: expected '<name> <degrees>', got {line!r}")
      deg = int(parts[1])
      if deg % 90:
        raise ValueError(f"{path}:{lineno}: rotation must be a multiple of 90")
      rotations[os.path.basename(parts[0])] = deg % 360
  return rotations


@datasets.register("holidays", default_split="test", splits=SPLITS, download="holidays")
def load_holidays(root: str, split: str = "test", image_dir: Optional[str] = None,
                  rotation_list: Optional[str] = None) -> datasets.RetrievalSet:
  """INRIA Holidays.

  Args:
    root: data root.
    split: 'test'.
    image_dir: folder of the images; default root/test/holidays/jpg.
    rotation_list: file of per-image clockwise rotations; default
      root/test/holidays/rotations.txt when it exists.

  Returns:
    RetrievalSet with 500 queries, 1491 db images, gnd {'ok', 'junk'}, group labels
    and `rotations` (path -> degrees, only non-zero entries).
  """
  datasets.check_split("holidays", split, SPLITS)
  base = os.path.join(root, "test", "holidays")
  image_dir = image_dir or os.path.join(base, "jpg")
  datasets.require(image_dir, "holidays", root, what="image folder")
  names = sorted(n for n in os.listdir(image_dir) if _NAME_RE.match(n))
  if not names:
    raise datasets.DatasetNotFoundError(
        f"holidays: no <NNNNNN>.jpg images in {image_dir}\n  Download them with: "
        f"{datasets.download_command('holidays', root)}")
  groups = np.asarray([int(_NAME_RE.match(n).group(1)) for n in names], np.int64)
  db_images = [os.path.join(image_dir, n) for n in names]
  query_idx = [i for i, n in enumerate(names) if _NAME_RE.match(n).group(2) == "00"]
  gnd = []
  for qi in query_idx:
    members = np.flatnonzero(groups == groups[qi])
    gnd.append({"ok": members[members != qi].astype(np.int64),
                "junk": np.asarray([qi], np.int64)})
  if rotation_list is None and os.path.exists(os.path.join(base, "rotations.txt")):
    rotation_list = os.path.join(base, "rotations.txt")
  rotations = None
  if rotation_list is not None:
    by_name = read_rotation_list(rotation_list)
    unknown = sorted(set(by_name) - set(names))
    if unknown:
      raise ValueError(f"{rotation_list}: images not in {image_dir}: {unknown[:5]}")
    rotations = {os.path.join(image_dir, n): d for n, d in by_name.items() if d}
  return datasets.RetrievalSet(
      name="holidays",
      query_images=[db_images[i] for i in query_idx],
      db_images=db_images,
      gnd=gnd,
      query_labels=groups[query_idx],
      db_labels=groups,
      rotations=rotations)
