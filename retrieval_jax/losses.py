"""Metric-learning and margin-softmax losses, as pure functions with documented shapes.

Pair and triplet losses follow cnnimageretrieval-pytorch (`cirtorch/layers/functional.py`)
exactly, because the margins published with its models assume those exact forms:

  contrastive (per pair):  0.5 * (y * d^2 + (1 - y) * max(0, m - d)^2),
                           d = sqrt(sum((a - x + eps)^2)), eps = 1e-6 added *inside* the
                           difference as the reference does (it also keeps d > 0, so the
                           gradient of sqrt stays finite for identical descriptors);
  triplet (per triplet):   max(0, ||a - p||^2 - ||a - n||^2 + m), squared distances, no eps;
                           the same form as Vaccaro et al. (ICMR 2020), alpha = 0.1.

The reference sums a tuple's pair losses (and accumulates gradients over the tuples of a
batch), so the per-pair functions here return unreduced values and the callers sum.

Classification-style losses (GLDv2-type training): `MarginHead` produces ArcFace or CosFace
logits from L2-normalised descriptors and L2-normalised class weights; `margin_softmax_loss`
is their mean cross-entropy.

Which code a `config.loss.name` selects is in `LOSSES` / `get_loss`; the mined pair losses
themselves (which descriptors form pairs) live in `mining/`.
"""
import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from retrieval_jax import registry
from retrieval_jax.models import pooling_ops

# cirtorch's epsilon inside the Euclidean distance of the contrastive loss.
CONTRASTIVE_EPS = 1e-6


def euclidean_distance(a: jnp.ndarray, b: jnp.ndarray, eps: float = CONTRASTIVE_EPS
                       ) -> jnp.ndarray:
  """cirtorch's distance `sqrt(sum((a - b + eps)^2))` along the last axis.

  Args:
    a: [..., D].
    b: [..., D], broadcastable with `a`.
    eps: added to the difference before squaring (reference behaviour).

  Returns:
    [...] distances.
  """
  return jnp.sqrt(jnp.sum(jnp.square(a - b + eps), axis=-1))


def contrastive_loss(anchor: jnp.ndarray, other: jnp.ndarray, is_positive: jnp.ndarray,
                     margin: float = 0.7, weights: Optional[jnp.ndarray] = None,
                     eps: float = CONTRASTIVE_EPS) -> jnp.ndarray:
  """Per-pair contrastive loss `0.5 * (y d^2 + (1 - y) max(0, m - d)^2)`.

  Args:
    anchor: [N, D] descriptors (L2-normalised in the reference setting).
    other: [N, D] the paired descriptors.
    is_positive: [N] bool (or 0/1), y = 1 for matching pairs.
    margin: m; cirtorch's default 0.7 (0.85 for its ResNet-101 GeM models).
    weights: optional [N] multipliers, e.g. a 0/1 validity mask for padded pairs.
    eps: see `euclidean_distance`.

  Returns:
    [N] per-pair losses (unreduced; the reference sums them).
  """
  y = is_positive.astype(anchor.dtype)
  d = euclidean_distance(anchor, other, eps)
  # The positive term is written with the squared distance itself (not d ** 2) so that it is
  # a polynomial in the inputs: identical value, better-conditioned gradient.
  sq = jnp.sum(jnp.square(anchor - other + eps), axis=-1)
  loss = 0.5 * y * sq + 0.5 * (1.0 - y) * jnp.square(jnp.maximum(margin - d, 0.0))
  if weights is not None:
    loss = loss * weights.astype(loss.dtype)
  return loss


def contrastive_tuple_loss(query: jnp.ndarray, positive: jnp.ndarray, negatives: jnp.ndarray,
                           margin: float = 0.7, eps: float = CONTRASTIVE_EPS) -> jnp.ndarray:
  """cirtorch's `ContrastiveLoss` on one tuple (q, p, n_1..n_k), label vector [-1, 1, 0, ...].

  Args:
    query: [D].
    positive: [D].
    negatives: [k, D].
    margin: contrastive margin m.
    eps: see `euclidean_distance`.

  Returns:
    Scalar: the sum over the k + 1 pairs (q, p), (q, n_1), ..., (q, n_k).
  """
  others = jnp.concatenate([positive[None], negatives], axis=0)  # [k + 1, D]
  anchors = jnp.broadcast_to(query[None], others.shape)
  is_positive = jnp.arange(others.shape[0]) == 0
  return jnp.sum(contrastive_loss(anchors, others, is_positive, margin, eps=eps))


def triplet_loss(anchor: jnp.ndarray, positive: jnp.ndarray, negative: jnp.ndarray,
                 margin: float = 0.1) -> jnp.ndarray:
  """Per-triplet loss `max(0, ||a - p||^2 - ||a - n||^2 + m)` (cirtorch / Vaccaro form).

  Squared Euclidean distances without eps, as `cirtorch.layers.functional.triplet_loss`.

  Args:
    anchor: [N, D].
    positive: [N, D].
    negative: [N, D].
    margin: m (0.1 in cirtorch and in Vaccaro et al.).

  Returns:
    [N] per-triplet losses (unreduced; the reference sums them).
  """
  d_pos = jnp.sum(jnp.square(anchor - positive), axis=-1)
  d_neg = jnp.sum(jnp.square(anchor - negative), axis=-1)
  return jnp.maximum(d_pos - d_neg + margin, 0.0)


def triplet_tuple_loss(query: jnp.ndarray, positive: jnp.ndarray, negatives: jnp.ndarray,
                       margin: float = 0.1) -> jnp.ndarray:
  """cirtorch's `TripletLoss` on one tuple (q, p, n_1..n_k): the sum of the k triplets.

  Args:
    query: [D].
    positive: [D].
    negatives: [k, D].
    margin: triplet margin m.

  Returns:
    Scalar sum over the k triplets (q, p, n_i).
  """
  k = negatives.shape[0]
  q = jnp.broadcast_to(query[None], (k, query.shape[-1]))
  p = jnp.broadcast_to(positive[None], (k, positive.shape[-1]))
  return jnp.sum(triplet_loss(q, p, negatives, margin))


# ----------------------------------------------------------------------------------------------
# ArcFace / CosFace.

MARGIN_HEAD_KINDS = ("arcface", "cosface")

# Defaults of the original papers (ArcFace m = 0.5, CosFace m = 0.35). The GLDv2-trained DELG
# global model (tensorflow/models research/delf, `delg_model.py`) uses ArcFace with m = 0.1 and a
# fixed scale sqrt(2048) = 45.25 with Glorot-uniform [D, C] weights: set those in the config
# when reproducing it.
DEFAULT_MARGINS = {"arcface": 0.5, "cosface": 0.35}


def arcface_target_logit(cos: jnp.ndarray, margin: float) -> jnp.ndarray:
  """cos(theta + m) with insightface's fallback (no "easy margin").

  Where theta + m would pass pi (cos <= th = cos(pi - m)), cos(theta + m) is no longer
  decreasing in theta, so insightface uses the linear penalty `cos - mm`, mm = sin(pi - m) * m,
  which keeps the target logit monotonic.

  Args:
    cos: [...] cosine similarities in [-1, 1].
    margin: additive angular margin m (radians).

  Returns:
    [...] modified cosines.
  """
  cos_m, sin_m = math.cos(margin), math.sin(margin)
  th = math.cos(math.pi - margin)
  mm = math.sin(math.pi - margin) * margin
  # The floor keeps sqrt's gradient finite when a descriptor equals its class weight.
  sin = jnp.sqrt(jnp.clip(1.0 - jnp.square(cos), 1e-12, 1.0))
  phi = cos * cos_m - sin * sin_m
  return jnp.where(cos > th, phi, cos - mm)


def margin_logits(cos: jnp.ndarray, labels: Optional[jnp.ndarray], *, kind: str, scale: float,
                  margin: float) -> jnp.ndarray:
  """Scaled logits with the margin applied to each row's target class.

  Args:
    cos: [B, C] cosine similarities between descriptors and class weights.
    labels: [B] int class ids, or None (no margin: inference / validation logits).
    kind: "arcface" (cos(theta + m)) or "cosface" (cos - m).
    scale: s, multiplies every logit.
    margin: m.

  Returns:
    [B, C] logits.
  """
  if kind not in MARGIN_HEAD_KINDS:
    raise ValueError(f"margin head kind must be one of {MARGIN_HEAD_KINDS}, got {kind!r}")
  if labels is None:
    return scale * cos
  if kind == "arcface":
    target = arcface_target_logit(cos, margin)
  else:
    target = cos - margin
  one_hot = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
  return scale * jnp.where(one_hot, target, cos)


class MarginHead(nn.Module):
  """Cosine classifier with an ArcFace or CosFace margin.

  Attributes:
    num_classes: C.
    scale: s. 30 is the common face-recognition / Kaggle GLDv2 setting; DELG on GLDv2 uses
      sqrt(2048) = 45.25 (see `DEFAULT_MARGINS`).
    margin: m; None picks `DEFAULT_MARGINS[kind]`.
    kind: "arcface" or "cosface".
    kernel_init: initialiser of the [D, C] class weights (Glorot uniform, as DELG).
  """
  num_classes: int
  scale: float = 30.0
  margin: Optional[float] = None
  kind: str = "arcface"
  kernel_init: Callable[..., Any] = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, descriptors: jnp.ndarray, labels: Optional[jnp.ndarray] = None
               ) -> jnp.ndarray:
    """Logits of `descriptors` [B, D] (normalised here); labels [B] or None -> [B, C]."""
    if self.kind not in MARGIN_HEAD_KINDS:
      raise ValueError(f"MarginHead.kind must be one of {MARGIN_HEAD_KINDS}, got {self.kind!r}")
    kernel = self.param("kernel", self.kernel_init, (descriptors.shape[-1], self.num_classes),
                        jnp.float32)
    # Cosines in float32 whatever the descriptor dtype: the margin acts on small angles.
    x = pooling_ops.normalize(descriptors.astype(jnp.float32), axis=-1)
    w = pooling_ops.normalize(kernel, axis=0)
    cos = jnp.clip(x @ w, -1.0, 1.0)
    margin = DEFAULT_MARGINS[self.kind] if self.margin is None else self.margin
    return margin_logits(cos, labels, kind=self.kind, scale=self.scale, margin=margin)


def margin_softmax_loss(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Mean softmax cross-entropy of margin logits.

  Args:
    logits: [B, C] from `MarginHead(...)(descriptors, labels)`.
    labels: [B] int class ids.

  Returns:
    Scalar mean over the batch.
  """
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                   labels))


# ----------------------------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """What `config.loss.name` selects.

  Attributes:
    name: registry key.
    family: how the train step uses it (`train/step.py` dispatches on it, `FAMILIES`):
      "pair": pairs mined in the global batch, `mining.in_batch.in_batch_mined_loss`, or the
        reference's per-tuple loss `tuple_fn` on epoch-mined tuples;
      "vaccaro": Algorithm 1 of Vaccaro et al., `mining.vaccaro.vaccaro_triplet_loss`;
      "margin_softmax": `MarginHead(kind=head_kind)` + `margin_softmax_loss`.
    fn: the per-pair / per-triplet function, or `margin_softmax_loss`.
    default_margin: the published default margin.
    head_kind: MarginHead kind for "margin_softmax".
    tuple_fn: the per-tuple (q, p, n_1..n_k) loss of "pair" losses (epoch mining).
  """
  name: str
  family: str
  fn: Callable[..., jnp.ndarray]
  default_margin: float
  head_kind: Optional[str] = None
  tuple_fn: Optional[Callable[..., jnp.ndarray]] = None


FAMILIES = ("pair", "vaccaro", "margin_softmax")

LOSSES: registry.Registry = registry.Registry("loss")
for _spec in (
    LossSpec("contrastive", "pair", contrastive_loss, 0.7, tuple_fn=contrastive_tuple_loss),
    LossSpec("triplet", "pair", triplet_loss, 0.1, tuple_fn=triplet_tuple_loss),
    LossSpec("vaccaro_triplet", "vaccaro", triplet_loss, 0.1),
    LossSpec("arcface", "margin_softmax", margin_softmax_loss, DEFAULT_MARGINS["arcface"],
             head_kind="arcface"),
    LossSpec("cosface", "margin_softmax", margin_softmax_loss, DEFAULT_MARGINS["cosface"],
             head_kind="cosface")):
  LOSSES.register(_spec.name, _spec)


def get_loss(name: str) -> LossSpec:
  """The `LossSpec` registered under `name` (see `LOSSES`)."""
  return LOSSES.get(name)
