"""Local-feature extraction of an image collection into a resumable store.

`extract_to_store` runs `keypoints.extract_keypoints` (bucketed, masked, sharded batches)
over the images that the store does not hold yet and streams every image's record into a
`store.LocalFeatureWriter`; a killed run re-run with the same arguments continues where its
last complete chunk ended.
"""
import json
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from retrieval_jax.local import keypoints as kp_lib
from retrieval_jax.local import model as local_model
from retrieval_jax.local import receptive_field as rf_lib
from retrieval_jax.local import store as store_lib


def local_dim(model, variables: Mapping[str, Any]) -> int:
  """Descriptor size of `model` (its "local_descriptors" channels), from a shape trace."""
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), np.uint8)
  out = jax.eval_shape(lambda v, x: model.apply(v, x)["local_descriptors"], variables, images)
  return int(out.shape[-1])


def extract_to_store(model, variables, paths: Sequence[str], folder: str, *,
                     backbone: str, backbone_kwargs: Optional[Mapping[str, Any]] = None,
                     mesh: Optional[jax.sharding.Mesh], long_side: int,
                     scales: Sequence[float] = (0.7071, 1.0, 1.4142),
                     score_threshold: float = 0.0, max_features: int = 1000,
                     iou_threshold: float = 1.0, batch_size: int = 8,
                     bboxes=None, chunk_size: int = 256, dtype: str = "float32",
                     image_list: Optional[Sequence[str]] = None, num_threads: int = 2,
                     log_every_s: float = 10.0, exif_transpose: bool = False
                     ) -> store_lib.LocalFeatureStore:
  """Extracts (or finishes extracting) the local features of `paths` into `folder`.

  Args:
    model, variables: a DelfNet / DelgNet (see keypoints.make_select_fn) and its variables.
    paths: N image files; bboxes: optional per-image crops (Revisited queries).
    folder: the store folder (see store.py).
    backbone, backbone_kwargs: the trunk (config.model), for its receptive field (with the
      model's `local_subsample`).
    mesh, long_side, scales, score_threshold, max_features, iou_threshold, batch_size,
      num_threads, log_every_s, exif_transpose: see `keypoints.extract_keypoints`.
    chunk_size, dtype, image_list: see `store.LocalFeatureWriter`.
  Returns:
    The finished store.
  """
  rf = rf_lib.receptive_field(backbone, backbone_kwargs,
                              subsample=local_model.local_subsample(model))
  settings = {"backbone": backbone, "receptive_field": [rf.size, rf.stride, rf.padding],
              "long_side": int(long_side),
              "scales": [float(s) for s in scales], "score_threshold": float(score_threshold),
              "max_features": int(max_features), "iou_threshold": float(iou_threshold),
              "crops": bboxes is not None, "input": "delg",
              "locations": "loaded_image_pixels", "exif_transpose": bool(exif_transpose)}
  writer = store_lib.LocalFeatureWriter(
      folder, len(paths), local_dim(model, variables), chunk_size=chunk_size, dtype=dtype,
      image_list=list(paths) if image_list is None else image_list,
      config=json.loads(json.dumps(settings)))
  for index, record in kp_lib.extract_keypoints(
      model, variables, paths, rf=rf, mesh=mesh, long_side=long_side, scales=scales,
      score_threshold=score_threshold, max_features=max_features,
      iou_threshold=iou_threshold, batch_size=batch_size, bboxes=bboxes, skip=writer.done,
      num_threads=num_threads, log_every_s=log_every_s, exif_transpose=exif_transpose):
    writer.add(index, record)
  return writer.close()
