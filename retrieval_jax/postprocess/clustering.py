"""k-means: PFA feature selection, and NetVLAD's codebook from training images.

`kmeans` is Lloyd's algorithm with k-means++ seeding in numpy float64 (PFA feature
selection, `whitening.select_features_pfa`). `kmeans_init` runs faiss k-means on L2-normalised
local descriptors and derives NetVLAD's assignment sharpness alpha from them;
`netvlad_kmeans_init` (`config.model.netvlad_init="kmeans"`) gathers those local descriptors
from the trunk's feature maps of a seeded sample of training images and writes the centres
into the model's NetVLAD params before training starts.
"""
import math
from typing import Any, Dict, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import extract
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.models import netvlad
from retrieval_jax.models import pooling
from retrieval_jax.models import pooling_ops

NETVLAD_INITS = ("", "kmeans")
NETVLAD_POOLINGS = ("netvlad", "ms_netvlad")
# Local descriptors the codebook k-means sees at most (a seeded subsample beyond that).
MAX_KMEANS_POINTS = 100_000


def kmeanspp_seeds(data: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
  """k-means++ seeding (Arthur & Vassilvitskii): k rows of data [N, D] (float64 [k, D]).

  The first centre uniformly, each next one with probability proportional to the squared
  distance to the nearest centre so far.
  """
  data = np.asarray(data, np.float64)
  n = data.shape[0]
  if n < k:
    raise ValueError(f"k-means: {n} points for {k} clusters")
  rng = np.random.default_rng(seed)
  sq = np.sum(data * data, axis=1)

  def sqdist(centers):
    d = sq[:, None] - 2.0 * data @ centers.T + np.sum(centers * centers, axis=1)[None]
    return np.maximum(d, 0.0)

  centers = [data[rng.integers(n)]]
  closest = sqdist(np.asarray(centers))[:, 0]
  for _ in range(1, k):
    total = closest.sum()
    i = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
    centers.append(data[i])
    closest = np.minimum(closest, sqdist(data[i][None])[:, 0])
  return np.asarray(centers)


def kmeans(data: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> Tuple[np.ndarray,
                                                                               np.ndarray]:
  """Lloyd's k-means with k-means++ seeding, in numpy float64.

  Args:
    data: [N, D], N >= k.
    k: number of clusters.
    seed: numpy seed.
    iters: maximum Lloyd iterations (stops earlier when assignments are stable).
  Returns:
    centers [k, D] float64 and labels [N] int.
  """
  data = np.asarray(data, np.float64)
  sq = np.sum(data * data, axis=1)

  def sqdist(centers):
    d = sq[:, None] - 2.0 * data @ centers.T + np.sum(centers * centers, axis=1)[None]
    return np.maximum(d, 0.0)

  centers = kmeanspp_seeds(data, k, seed)

  labels = None
  for _ in range(iters):
    d = sqdist(centers)
    new = np.argmin(d, axis=1)
    if labels is not None and np.array_equal(new, labels):
      break
    labels = new
    for j in range(k):
      members = labels == j
      if members.any():
        centers[j] = data[members].mean(axis=0)
      else:
        # An empty cluster takes the point worst served by the current centres.
        far = int(np.argmax(np.min(d, axis=1)))
        centers[j] = data[far]
        d[far] = 0.0
  labels = np.argmin(sqdist(centers), axis=1)
  return centers, labels


def faiss_kmeans(data: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> np.ndarray:
  """Centres [k, D] float32 of faiss's k-means (Lloyd, float32, k-means++ seeds) of [N, D]."""
  # Imported here: faiss is slow and noisy to import, and only codebook learning needs it.
  import faiss  # pylint: disable=import-outside-toplevel
  data = np.ascontiguousarray(data, np.float32)
  if data.shape[0] < k:
    raise ValueError(f"k-means: {data.shape[0]} points for {k} clusters; describe more "
                     "images (model.netvlad_init_images)")
  km = faiss.Kmeans(data.shape[1], k, niter=iters, seed=seed, verbose=False)
  # k-means++ seeds: faiss's default (k random points) often merges well separated clusters.
  km.train(data, init_centroids=kmeanspp_seeds(data, k, seed).astype(np.float32))
  return np.asarray(km.centroids, np.float32).reshape(k, data.shape[1])


def kmeans_init(local_descriptors: np.ndarray, num_clusters: int, seed: int = 0,
                iters: int = 30) -> Tuple[np.ndarray, float]:
  """NetVLAD codebook: k-means of L2-normalised local descriptors, and a matching alpha.

  alpha makes the second-nearest centroid get on average 1% of the nearest one's weight:
  `alpha = -log(0.01) / mean(d2 - d1)`, d1 <= d2 the squared distances of each descriptor
  to its two nearest centroids (since `softmax(alpha (2 c.x - |c|^2)) =
  softmax(-alpha |x - c|^2)`). pytorch-NetVLAD writes the same formula but takes the
  k-NN of the centroids among descriptors, and reads the neighbours' indices instead of their
  distances; we use the distances the formula intends.

  Args:
    local_descriptors: [N, C], e.g. feature-map positions of sample images.
    num_clusters: K.
    seed, iters: k-means settings (faiss).
  Returns:
    centroids [K, C] float32 (not re-normalised) and alpha (float).
  """
  desc = np.asarray(local_descriptors, np.float64)
  desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True),
                           pooling_ops.NORMALIZE_EPS)
  centers = faiss_kmeans(desc, num_clusters, seed, iters).astype(np.float64)
  d = (np.sum(desc ** 2, axis=1)[:, None] - 2.0 * desc @ centers.T
       + np.sum(centers ** 2, axis=1)[None])
  d = np.sort(np.maximum(d, 0.0), axis=1)
  gap = float(np.mean(d[:, 1] - d[:, 0])) if num_clusters > 1 else 0.0
  alpha = -math.log(0.01) / gap if gap > 0 else 100.0
  return centers.astype(np.float32), alpha


def local_descriptors(model, variables, images: Sequence[str], mesh, *, image_size: int,
                      batch_size: int, num_threads: int = 2) -> np.ndarray:
  """What a NetVLAD layer aggregates, for every image: [M, C] valid local descriptors.

  The trunk's feature map positions ("netvlad"), or Vaccaro et al.'s multi-scale column
  features ("ms_netvlad"), of the images resized and padded as training sees them.
  """
  pool = pooling.build_pooling(model.pooling, **dict(model.pooling_kwargs or {}))
  windows = tuple(getattr(pool, "windows", ()))

  def describe(v, x, m):
    fmap, fmask = model.apply(v, x, m, method="trunk")[0]
    if model.pooling == "ms_netvlad":
      desc, valid = netvlad.multiscale_column_features(fmap, windows, fmask)
    else:
      b, h, w, c = fmap.shape
      desc, valid = fmap.reshape(b, h * w, c), fmask.reshape(b, h * w)
    return jnp.where(valid[..., None], desc, jnp.nan)  # padding rows: NaN, dropped below

  rep = sharding_lib.replicated(mesh)
  fn = jax.jit(describe, in_shardings=(rep, sharding_lib.batch_sharding(mesh),
                                       sharding_lib.batch_sharding(mesh)), out_shardings=rep)
  out = []
  for _, d in extract.described_training_rows(
      fn, jax.device_put(variables, rep), images, np.arange(len(images)), mesh=mesh,
      image_size=image_size, batch_size=batch_size, num_threads=num_threads):
    d = d.reshape(-1, d.shape[-1])
    out.append(d[~np.isnan(d).any(axis=1)])
  if not out:
    raise RuntimeError("no image could be read for the NetVLAD k-means")
  return np.concatenate(out)


def netvlad_kmeans_init(config, model, variables: Dict[str, Any], images: Sequence[str],
                        mesh) -> Dict[str, Any]:
  """`variables` with NetVLAD's centroids (and decoupled assignment) from a k-means.

  Describes `config.model.netvlad_init_images` training images (seeded by `config.seed`),
  clusters their local descriptors (at most MAX_KMEANS_POINTS, seeded subsample) into
  `pooling_kwargs.num_clusters` centres, and writes them to `params/pool`. The assignment
  keeps `pooling_kwargs.alpha` (a module attribute, so a restored network is the same); the
  data's suggested alpha is logged.
  """
  if config.model.pooling not in NETVLAD_POOLINGS:
    raise ValueError(f"model.netvlad_init='kmeans' needs model.pooling in {NETVLAD_POOLINGS}, "
                     f"got {config.model.pooling!r}")
  rng = np.random.default_rng(config.seed)
  count = min(int(config.model.netvlad_init_images), len(images))
  pick = np.sort(rng.choice(len(images), count, replace=False))
  desc = local_descriptors(model, variables, [images[i] for i in pick], mesh,
                           image_size=int(config.data.image_size),
                           batch_size=int(config.extract.batch_size),
                           num_threads=int(config.data.num_threads))
  if len(desc) > MAX_KMEANS_POINTS:
    desc = desc[np.sort(rng.choice(len(desc), MAX_KMEANS_POINTS, replace=False))]
  # The pooling module as configured: its attributes, defaults included (no copies here).
  vlad = pooling.build_pooling(model.pooling, **dict(model.pooling_kwargs or {}))
  centroids, alpha = kmeans_init(desc, int(vlad.num_clusters), seed=int(config.seed))
  logging.info("NetVLAD k-means: %d centres from %d local descriptors of %d images; the data "
               "suggest alpha=%.1f (model.pooling_kwargs.alpha=%s is used)", vlad.num_clusters,
               len(desc), count, alpha, vlad.alpha)
  pool = dict(netvlad.netvlad_params(centroids, float(vlad.alpha),
                                     decoupled=bool(vlad.decoupled)))
  params = dict(variables["params"])
  params["pool"] = {k: jnp.asarray(v) for k, v in pool.items()}
  return dict(variables, params=params)
