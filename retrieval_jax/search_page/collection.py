"""The described images, named by their path under the collection's root folder.

The server hands out a file only when (1) its name is one of the described images (so no
`..`, absolute path or unlisted file is ever opened) and (2) the file it resolves to, after
symlinks, still lies inside the root, so a link in the photo folder that points elsewhere is
not followed.
"""
import os
import urllib.parse
from typing import List, Optional, Sequence

from absl import logging


class Collection:
  """The images of an index in images.txt order.

  Attributes:
    listed: N image paths as images.txt lists them (row i = descriptor row i), the
      "image" of a result, as in --mode=search's results.json.
    paths: the same, absolute.
    names: N paths relative to `root`, '/'-separated: what `/images/<name>` takes.
    root: the deepest folder holding every image.
  """

  def __init__(self, image_paths: Sequence[str]):
    if not image_paths:
      raise ValueError("the index lists no images (images.txt is empty): describe a folder "
                       "with --mode=describe first")
    self.listed: List[str] = list(image_paths)
    self.paths: List[str] = [os.path.abspath(p) for p in image_paths]
    self.root = os.path.commonpath([os.path.dirname(p) for p in self.paths])
    self.names: List[str] = [os.path.relpath(p, self.root).replace(os.sep, "/")
                             for p in self.paths]
    self._by_name = dict(zip(self.names, self.paths))
    self._real_root = os.path.realpath(self.root)
    self._served = [self._inside(p) for p in self.paths]
    outside = self._served.count(False)
    if outside:
      logging.warning("serve: %d described images are symlinks out of %s and will not be "
                      "served", outside, self.root)

  def __len__(self) -> int:
    return len(self.paths)

  def _inside(self, path: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, self._real_root]) == self._real_root

  def url(self, row: int) -> Optional[str]:
    """`/images/<name>` of row `row`; None for an image the server will not hand out."""
    return "/images/" + urllib.parse.quote(self.names[row]) if self._served[row] else None

  def file(self, name: str) -> Optional[str]:
    """The file behind `/images/<name>`, or None when it is not a served collection file."""
    path = self._by_name.get(name)
    if path is None or not self._inside(path) or not os.path.isfile(path):
      return None
    return path
