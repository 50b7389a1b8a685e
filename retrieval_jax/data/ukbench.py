"""UKBench (Nister & Stewenius 2006): groups of 4 photos of one object, 640x480.

Layout: root/test/ukbench/full/ukbenchNNNNN.jpg (the official zip's `full/` folder);
`root/test/ukbench/jpg/` or the images directly in `root/test/ukbench/` are accepted too,
or any folder through `image_dir`. The group of `ukbenchNNNNN.jpg` is NNNNN // 4.

Protocol: every image is a query and every image is in the database. The benchmark's
score (N-S score, "top-4") counts how many of the query's group, the query included,
are in the top 4; so gnd 'ok' holds all 4 group members, the query itself too, and
`query_labels` / `db_labels` carry the group ids.
"""
import os
import re
from typing import Optional

import numpy as np

from retrieval_jax.data import datasets

SPLITS = ("test",)  # the loader's splits, declared to datasets.register

_NAME_RE = re.compile(r"^ukbench(\d+)\.jpg$", re.IGNORECASE)


def _find_image_dir(root: str) -> Optional[str]:
  base = os.path.join(root, "test", "ukbench")
  for cand in (os.path.join(base, "full"), os.path.join(base, "jpg"), base):
    if os.path.isdir(cand) and any(_NAME_RE.match(n) for n in os.listdir(cand)):
      return cand
  return None


@datasets.register("ukbench", default_split="test", splits=SPLITS, exif_transpose=False,
                   download="ukbench")
def load_ukbench(root: str, split: str = "test", image_dir: Optional[str] = None,
                 allow_incomplete: bool = False) -> datasets.RetrievalSet:
  """UKBench.

  Args:
    root: data root.
    split: 'test'.
    image_dir: folder of ukbenchNNNNN.jpg; default: found under root/test/ukbench.
    allow_incomplete: accept groups with fewer than 4 images (subsets).

  Returns:
    RetrievalSet with every image as query and database image, gnd {'ok', 'junk'} and
    group labels.
  """
  datasets.check_split("ukbench", split, SPLITS)
  if image_dir is None:
    image_dir = _find_image_dir(root)
    if image_dir is None:
      raise datasets.DatasetNotFoundError(
          f"ukbench: missing image folder {os.path.join(root, 'test', 'ukbench', 'full')}"
          f" (no ukbenchNNNNN.jpg files)\n  Download it with: "
          f"{datasets.download_command('ukbench', root)}")
  datasets.require(image_dir, "ukbench", root, what="image folder")
  names = [n for n in os.listdir(image_dir) if _NAME_RE.match(n)]
  names.sort(key=lambda n: int(_NAME_RE.match(n).group(1)))
  numbers = np.asarray([int(_NAME_RE.match(n).group(1)) for n in names], np.int64)
  labels = numbers // 4
  _, counts = np.unique(labels, return_counts=True)
  if not allow_incomplete and np.any(counts != 4):
    bad = np.unique(labels)[counts != 4][:5]
    raise ValueError(f"ukbench: groups {bad.tolist()} in {image_dir} do not have 4 "
                     "images; pass allow_incomplete=True for a partial copy")
  images = [os.path.join(image_dir, n) for n in names]
  gnd = [{"ok": np.flatnonzero(labels == labels[i]).astype(np.int64),
          "junk": np.zeros((0,), np.int64)} for i in range(len(images))]
  return datasets.RetrievalSet(name="ukbench", query_images=list(images),
                               db_images=images, gnd=gnd, query_labels=labels.copy(),
                               db_labels=labels)
