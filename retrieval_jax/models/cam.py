"""Seddati et al.'s CAM-based local masks ("Localization (optional)", after Zhou et al.'s CAM).

Pure jnp functions of a feature map [B, H, W, C] and an ImageNet classifier [C, K], plus
`cam_classifier_params`, which finds that classifier in a trunk's weight file.
"""
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models import pooling_ops as ops

Array = jnp.ndarray

# The paper keeps positions whose heatmap reaches 0.9 x its average.
CAM_THRESHOLD = 0.9


def cam_class_scores(x: Array, class_kernel: Array, class_bias: Optional[Array] = None,
                     mask: Optional[Array] = None) -> Array:
  """The classifier's logits: FC of the spatial average (their adaptive average pool).

  Args:
    x: [B, H, W, C] last conv feature map (the one the classifier was trained on).
    class_kernel: [C, K] FC weights (torch `weight.T`).
    class_bias: optional [K].
    mask: optional [B, H, W] bool; the average runs over valid positions.
  Returns:
    [B, K] float32.
  """
  scores = jnp.einsum("bc,ck->bk", ops.spoc(x, mask), jnp.asarray(class_kernel, jnp.float32),
                      precision=ops.HIGHEST)
  if class_bias is not None:
    scores = scores + jnp.asarray(class_bias, jnp.float32)
  return scores


def cam_heatmap(x: Array, class_kernel: Array, top_k: int = 1,
                class_bias: Optional[Array] = None, mask: Optional[Array] = None) -> Array:
  """Class activation map of the top-k predicted classes: [B, H, W, C] -> [B, H, W].

  CAM (Zhou et al.): `sum_c w_{k,c} x[h, w, c]` for the class k with the highest score. For
  `top_k > 1` (not in the paper, which uses the top class only) the maps of the k best
  classes are averaged, i.e. the CAM of their mean weight vector. Padded positions are 0.
  """
  x = ops.fill_padding(jnp.asarray(x, jnp.float32), mask, 0.0)
  kernel = jnp.asarray(class_kernel, jnp.float32)
  if not 1 <= top_k <= kernel.shape[1]:
    raise ValueError(f"cam: top_k must be in [1, {kernel.shape[1]}], got {top_k}")
  _, idx = jax.lax.top_k(cam_class_scores(x, kernel, class_bias, mask), top_k)  # [B, k]
  weights = jnp.mean(kernel.T[idx], axis=1)  # [B, C]
  return jnp.einsum("bhwc,bc->bhw", x, weights, precision=ops.HIGHEST)


def cam_mask(x: Array, class_kernel: Array, top_k: int = 1, mask: Optional[Array] = None,
             class_bias: Optional[Array] = None,
             threshold: float = CAM_THRESHOLD) -> Array:
  """Seddati et al.'s binary CAM mask: [B, H, W, C], [C, K] -> [B, H, W] float32 in {0, 1}.

  1 where `cam_heatmap >= threshold * average(heatmap)`, the average over valid positions;
  0 elsewhere and on padding. The mask is piecewise constant: no gradient flows through it.

  Args:
    x: [B, H, W, C] last conv feature map.
    class_kernel: [C, K] ImageNet FC weights; class_bias: optional [K] (only picks classes).
    top_k: number of top-scoring classes whose CAMs are averaged (paper: 1).
    mask: optional [B, H, W] bool validity mask.
    threshold: fraction of the average heatmap (paper: 0.9).
  Returns:
    [B, H, W] float32.
  """
  heat = cam_heatmap(x, class_kernel, top_k, class_bias, mask)
  if mask is None:
    avg = jnp.mean(heat, axis=(1, 2))
  else:
    avg = (jnp.sum(jnp.where(mask, heat, 0.0), axis=(1, 2))
           / jnp.sum(mask, axis=(1, 2), dtype=jnp.float32))
  # `>=` rather than `>`: an all-zero map (mean 0) keeps everything instead of nothing.
  keep = heat >= threshold * avg[:, None, None]
  if mask is not None:
    keep = keep & mask
  return jax.lax.stop_gradient(keep.astype(jnp.float32))


def seddati_cam_rmac(x: Array, class_kernel: Array, top_k: int = 1, levels: int = 3,
                     mask: Optional[Array] = None, class_bias: Optional[Array] = None,
                     threshold: float = CAM_THRESHOLD) -> Array:
  """Seddati et al.'s local R-MAC: the CAM mask times the map, then `ops.seddati_rmac`.

  The paper multiplies the binary mask with the feature maps (masked-out positions become
  0, the minimum of ReLU features) and computes the modified R-MAC on the product.

  Returns:
    [B, C] float32, L2-normalised.
  """
  x = jnp.asarray(x, jnp.float32)
  cam = cam_mask(x, class_kernel, top_k, mask, class_bias, threshold)
  # `where`, not a product: padding may hold inf / NaN (0 * inf); ops.seddati_rmac masks it.
  local = jnp.where(cam[..., None] > 0, x, 0.0)
  return ops.seddati_rmac(local, levels, mask)


# ImageNet classifier tensors of the supported weight files: (weight [K, C], bias [K]).
_CLASSIFIER_KEYS = (("classifier.1.weight", "classifier.1.bias"),  # torchvision MobileNetV2
                    ("_fc.weight", "_fc.bias"),                    # EfficientNet-Lite0
                    ("fc.weight", "fc.bias"))                      # torchvision / timm ResNet


def cam_classifier_params(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The params of `CAMSeddatiPool` from a trunk's weight file (torch state dict as numpy).

  Returns:
    {"class_kernel": [C, K] float32, "class_bias": [K] float32}.
  Raises:
    ValueError: no single-FC ImageNet classifier (e.g. VGG's three FC layers) in the file.
  """
  for wkey, bkey in _CLASSIFIER_KEYS:
    if wkey in state_dict:
      w = np.asarray(state_dict[wkey], np.float32)
      b = np.asarray(state_dict[bkey], np.float32) if bkey in state_dict else np.zeros(
          w.shape[0], np.float32)
      return {"class_kernel": np.ascontiguousarray(w.T), "class_bias": b}
  raise ValueError("no single-FC ImageNet classifier in the state dict (expected one of "
                   f"{[k for k, _ in _CLASSIFIER_KEYS]})")

