"""Pictures of retrieval results: a query and its top-k, bordered by correctness.

One row per query: the query (blue border), then its top-k database images bordered green
(a positive, 'ok'), orange ('junk', ignored by the metric) or red (wrong). PIL only, so it
runs wherever the evaluation runs.

Layout (deterministic, so tests can probe pixels): every image is shrunk to fit a
`thumb x thumb` box, centred on a grey square, and surrounded by a `border`-pixel frame;
cells are `cell = thumb + 2 * border` wide and separated (and surrounded) by `gap` white
pixels. A grid of R rows is `(k + 1) * (cell + gap) + gap` wide and `R * (cell + gap) + gap`
high; cell c of row r starts at `(gap + c * (cell + gap), gap + r * (cell + gap))`.
"""
import io
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np
from PIL import Image

from retrieval_jax import storage
from retrieval_jax.data import image_io

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]
Colour = Tuple[int, int, int]

QUERY_COLOUR: Colour = (0, 90, 255)
OK_COLOUR: Colour = (0, 170, 0)
JUNK_COLOUR: Colour = (255, 140, 0)
WRONG_COLOUR: Colour = (220, 0, 0)
_BACKGROUND: Colour = (255, 255, 255)
_CELL_FILL: Colour = (128, 128, 128)


def to_pil(image: ImageLike) -> Image.Image:
  """Loads a path, or converts an array ([H, W], [H, W, 3|4]; uint8 or float in [0, 1])."""
  if isinstance(image, Image.Image):
    return image.convert('RGB')
  if isinstance(image, (str, os.PathLike)):
    try:
      with image_io.open_image_file(os.fspath(image)) as f, Image.open(f) as im:
        return im.convert('RGB')
    except Exception as e:  # pylint: disable=broad-except (an unreadable file: grey tile)
      logging.warning('pictures: cannot read %s (%s)', os.fspath(image), e)
      return Image.new('RGB', (8, 8), _CELL_FILL)
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    # Float images are taken to be in [0, 1], the usual convention before normalisation.
    arr = (np.clip(arr.astype(np.float64), 0., 1.) * 255. + .5).astype(np.uint8)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  return Image.fromarray(arr).convert('RGB')


def framed_thumbnail(image: ImageLike, colour: Colour, thumb: int, border: int
                     ) -> Image.Image:
  """[cell, cell] RGB tile: the image fitted in `thumb`, centred, in a coloured frame."""
  im = to_pil(image)
  scale = min(thumb / im.width, thumb / im.height)
  size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
  im = im.resize(size, Image.Resampling.BILINEAR)
  cell = thumb + 2 * border
  tile = Image.new('RGB', (cell, cell), colour)
  inner = Image.new('RGB', (thumb, thumb), _CELL_FILL)
  inner.paste(im, ((thumb - size[0]) // 2, (thumb - size[1]) // 2))
  tile.paste(inner, (border, border))
  return tile


def result_colours(ranked: Sequence[int], gnd_entry: Mapping[str, Any]) -> list:
  """Border colour for every ranked database index: ok green, junk orange, else red."""
  ok = set(np.asarray(gnd_entry.get('ok', []), dtype=np.int64).tolist())
  junk = set(np.asarray(gnd_entry.get('junk', []), dtype=np.int64).tolist())
  out = []
  for idx in ranked:
    idx = int(idx)
    out.append(OK_COLOUR if idx in ok else JUNK_COLOUR if idx in junk else WRONG_COLOUR)
  return out


def results_grid(
    query_images: Sequence[ImageLike],
    db_images: Union[Sequence[ImageLike], Callable[[int], ImageLike]],
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    *,
    query_ids: Optional[Sequence[int]] = None,
    k: int = 10,
    thumb: int = 128,
    border: int = 6,
    gap: int = 4,
) -> Image.Image:
  """Builds the picture of several queries, one row each.

  Args:
    query_images: [Nq] query images (paths, arrays or PIL images), already cropped.
    db_images: [Nd] database images, or a function index -> image (only the shown ones are
      loaded).
    ranks: [Nd, Nq] rankings (revisitop convention: column j for query j).
    gnd: Nq dicts with 'ok' and optionally 'junk' database indices.
    query_ids: which queries to draw (default: all), one row each in this order.
    k: results per query.
    thumb, border, gap: layout in pixels (see the module docstring).

  Returns:
    An RGB PIL image.
  """
  ranks = np.asarray(ranks)
  if query_ids is None:
    query_ids = range(ranks.shape[1])
  query_ids = list(query_ids)
  k = min(k, ranks.shape[0])
  get_db = db_images if callable(db_images) else db_images.__getitem__
  cell = thumb + 2 * border
  width = (k + 1) * (cell + gap) + gap
  height = len(query_ids) * (cell + gap) + gap
  canvas = Image.new('RGB', (width, height), _BACKGROUND)
  for r, q in enumerate(query_ids):
    y = gap + r * (cell + gap)
    canvas.paste(framed_thumbnail(query_images[q], QUERY_COLOUR, thumb, border), (gap, y))
    ranked = ranks[:k, q]
    for c, (idx, colour) in enumerate(zip(ranked, result_colours(ranked, gnd[q])), start=1):
      canvas.paste(framed_thumbnail(get_db(int(idx)), colour, thumb, border),
                   (gap + c * (cell + gap), y))
  return canvas


def save_results(path: Union[str, os.PathLike], *args, **kwargs) -> Image.Image:
  """`results_grid(*args, **kwargs)` written to `path` as PNG; returns the image."""
  image = results_grid(*args, **kwargs)
  buf = io.BytesIO()
  image.save(buf, format='PNG')
  storage.write_bytes(path, buf.getvalue())  # a local folder or a gs:// workdir
  return image


def save_per_query(
    out_dir: Union[str, os.PathLike],
    query_images: Sequence[ImageLike],
    db_images: Union[Sequence[ImageLike], Callable[[int], ImageLike]],
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    *,
    query_ids: Optional[Sequence[int]] = None,
    prefix: str = 'query',
    **kwargs,
) -> list:
  """One PNG per query, `<out_dir>/<prefix>_<qid:03d>.png`; returns the paths written.

  `kwargs` are `results_grid`'s layout options (k, thumb, border, gap).
  """
  if query_ids is None:
    query_ids = range(np.asarray(ranks).shape[1])
  paths = []
  for q in query_ids:
    path = os.path.join(os.fspath(out_dir), f'{prefix}_{q:03d}.png')
    save_results(path, query_images, db_images, ranks, gnd, query_ids=[q], **kwargs)
    paths.append(path)
  return paths
