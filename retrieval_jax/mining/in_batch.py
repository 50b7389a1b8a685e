"""In-step hard-example mining over the global batch: pairs and triplets with mined negatives.

The global batch (composed by the sampler of several landmarks with several images each) is
its own pool. Every device all-gathers the descriptors and labels, scores its local anchors
against the whole batch ([b, B], memory O(b x B)), masks itself and same-label images, takes
the top-k most similar negatives and forms pairs (contrastive) or triplets with the anchor's
positives. Local sums are `psum`-ed. Selection is not differentiated (`stop_gradient`), the
loss is: gradients flow through the gathered rows, and `all_gather`'s transpose (a
reduce-scatter) returns them to the devices that own the rows.

With `mesh=None` (or a 1-device mesh) the same values are computed without collectives.
Vaccaro et al.'s triplets: `vaccaro.py`; epoch-level (host) mining: `epoch.py`.
"""
import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from retrieval_jax import losses
from retrieval_jax.mining import collectives

Metrics = Dict[str, jnp.ndarray]

PAIR_LOSSES = ("contrastive", "triplet")
POSITIVE_MODES = ("all", "hardest")
REDUCTIONS = ("sum", "mean")


def select_in_batch(desc: jnp.ndarray, labels: jnp.ndarray, all_desc: jnp.ndarray,
                     all_labels: jnp.ndarray, offset: jnp.ndarray, num_negatives: int
                     ) -> Dict[str, jnp.ndarray]:
  """Negatives and positives of the local anchors among the global batch (not differentiated).

  Args:
    desc: [b, D] local anchors.
    labels: [b] their labels.
    all_desc: [B, D] the gathered batch.
    all_labels: [B].
    offset: global index of local row 0.
    num_negatives: k.

  Returns:
    neg_idx [b, k] int32 global indices (most similar first), neg_valid [b, k] (False when
    the batch holds fewer than k images of other labels), pos_mask [b, B] (same label, not
    self), hardest_pos [b] (least similar positive), has_pos [b].
  """
  batch = all_desc.shape[0]
  if not 0 < num_negatives <= batch:
    raise ValueError(f"loss.num_negatives must be in [1, {batch}] (the global batch), got "
                     f"{num_negatives}: lower it or enlarge the batch")
  # [b, B]; HIGHEST: TPU bf16 passes / GPU TF32 must not change which negatives are mined.
  sim = jnp.matmul(jax.lax.stop_gradient(desc), jax.lax.stop_gradient(all_desc).T,
                   precision=jax.lax.Precision.HIGHEST)
  anchor_idx = offset + jnp.arange(desc.shape[0], dtype=jnp.int32)
  is_self = jnp.arange(batch, dtype=jnp.int32)[None, :] == anchor_idx[:, None]
  same = labels[:, None] == all_labels[None, :]  # includes self
  neg_sim, neg_idx = jax.lax.top_k(jnp.where(same, -jnp.inf, sim), num_negatives)
  pos_mask = same & ~is_self
  hardest_pos = jnp.argmin(jnp.where(pos_mask, sim, jnp.inf), axis=1).astype(jnp.int32)
  return {"neg_idx": neg_idx.astype(jnp.int32), "neg_valid": neg_sim > -jnp.inf,
          "pos_mask": pos_mask, "hardest_pos": hardest_pos, "has_pos": pos_mask.any(axis=1)}


def _dense_sq_dist(a: jnp.ndarray, x: jnp.ndarray, eps: float) -> jnp.ndarray:
  """[b, B] `sum((a_i - x_j + eps)^2)` from matmuls, without a [b, B, D] difference tensor.

  Used only for positive terms, which are polynomials of the squared distance: the float32
  cancellation error (~1e-7 absolute) never meets a sqrt.
  """
  dim = a.shape[-1]
  sq_a = jnp.sum(jnp.square(a), -1)[:, None]
  sq_x = jnp.sum(jnp.square(x), -1)[None, :]
  out = sq_a + sq_x - 2.0 * jnp.matmul(a, x.T, precision=jax.lax.Precision.HIGHEST)
  if eps:
    out = out + 2.0 * eps * (jnp.sum(a, -1)[:, None] - jnp.sum(x, -1)[None, :]) + dim * eps**2
  return out


def _in_batch_body(desc: jnp.ndarray, labels: jnp.ndarray, *, axis_name: Optional[str],
                   loss_name: str, margin: float, num_negatives: int, positives: str,
                   reduction: str, eps: float) -> Tuple[jnp.ndarray, Metrics]:
  """Per-device part of `in_batch_mined_loss`; returns globally reduced values."""
  desc = desc.astype(jnp.float32)
  all_desc = collectives.gather(desc, axis_name)
  all_labels = collectives.gather(labels, axis_name)
  offset = collectives.global_offset(desc.shape[0], axis_name)
  sel = select_in_batch(desc, labels, all_desc, all_labels, offset, num_negatives)
  neg_valid, pos_mask, has_pos = sel["neg_valid"], sel["pos_mask"], sel["has_pos"]
  negs = all_desc[sel["neg_idx"]]  # [b, k, D]; differentiable gather of the global rows
  hardest = all_desc[sel["hardest_pos"]]  # [b, D]
  sg = jax.lax.stop_gradient

  if loss_name == "contrastive":
    d_neg = losses.euclidean_distance(desc[:, None, :], negs, eps)  # [b, k]
    neg_terms = 0.5 * jnp.square(jnp.maximum(margin - d_neg, 0.0))
    loss_sum = jnp.sum(jnp.where(neg_valid, neg_terms, 0.0))
    if positives == "all":
      sq_pos = _dense_sq_dist(desc, all_desc, eps)  # [b, B]
      loss_sum += jnp.sum(jnp.where(pos_mask, 0.5 * sq_pos, 0.0))
    else:
      sq_pos = jnp.sum(jnp.square(desc - hardest + eps), -1)  # [b]
      loss_sum += jnp.sum(jnp.where(has_pos, 0.5 * sq_pos, 0.0))
    active_num = jnp.sum(neg_valid & (sg(d_neg) < margin))
    active_den = jnp.sum(neg_valid)
  else:  # triplet
    sq_neg = jnp.sum(jnp.square(desc[:, None, :] - negs), -1)  # [b, k]
    d_neg = jnp.sqrt(sg(sq_neg))
    if positives == "all":
      sq_pos = _dense_sq_dist(desc, all_desc, 0.0)  # [b, B]
      hinge = jnp.maximum(sq_pos[:, :, None] - sq_neg[:, None, :] + margin, 0.0)  # [b, B, k]
      valid = pos_mask[:, :, None] & neg_valid[:, None, :]
    else:
      sq_pos = jnp.sum(jnp.square(desc - hardest), -1)  # [b]
      hinge = jnp.maximum(sq_pos[:, None] - sq_neg + margin, 0.0)  # [b, k]
      valid = has_pos[:, None] & neg_valid
    loss_sum = jnp.sum(jnp.where(valid, hinge, 0.0))
    active_num = jnp.sum(valid & (sg(hinge) > 0.0))
    active_den = jnp.sum(valid)

  sq_pos = sg(sq_pos)
  d_pos = jnp.sqrt(jnp.maximum(sq_pos, 0.0))
  if positives == "all":
    pos_dist_sum, pos_count = jnp.sum(jnp.where(pos_mask, d_pos, 0.0)), jnp.sum(pos_mask)
  else:
    pos_dist_sum, pos_count = jnp.sum(jnp.where(has_pos, d_pos, 0.0)), jnp.sum(has_pos)
  sums = {
      "loss": loss_sum,
      "num_anchors": jnp.asarray(desc.shape[0], jnp.float32),
      "anchors_with_positives": jnp.sum(has_pos).astype(jnp.float32),
      "pos_dist": pos_dist_sum,
      "pos_count": pos_count.astype(jnp.float32),
      "neg_dist": jnp.sum(jnp.where(neg_valid, sg(d_neg), 0.0)),
      "neg_count": jnp.sum(neg_valid).astype(jnp.float32),
      "active": active_num.astype(jnp.float32),
      "active_den": active_den.astype(jnp.float32),
  }
  sums = collectives.psum(sums, axis_name)
  loss = sums["loss"] if reduction == "sum" else sums["loss"] / sums["num_anchors"]
  metrics = {
      "mean_pos_dist": collectives.safe_div(sums["pos_dist"], sums["pos_count"]),
      "mean_neg_dist": collectives.safe_div(sums["neg_dist"], sums["neg_count"]),
      "active_fraction": collectives.safe_div(sums["active"], sums["active_den"]),
      "frac_anchors_with_positives": sums["anchors_with_positives"] / sums["num_anchors"],
  }
  return loss, metrics


def in_batch_mined_loss(descriptors: jnp.ndarray, labels: jnp.ndarray, *, mesh: Optional[Mesh],
                        loss_name: str = "contrastive", margin: float = 0.7,
                        num_negatives: int = 5, positives: str = "all", reduction: str = "sum",
                        data_axis: Optional[str] = None, eps: float = losses.CONTRASTIVE_EPS
                        ) -> Tuple[jnp.ndarray, Metrics]:
  """Pair / triplet loss with hard negatives mined over the global batch.

  For every anchor i of the batch: its negatives are the `num_negatives` most similar images
  (dot product) with a different label; its positives are every other image with its label
  (`positives="all"`) or only the least similar one (`"hardest"`).

  * contrastive: the pairs (i, p) for its positives and (i, n) for its negatives, each with
    `losses.contrastive_loss` (the reference's tuple loss is the sum over such pairs);
  * triplet: the triplets (i, p, n) for every positive p and mined negative n, each with
    `losses.triplet_loss`.

  An anchor without a positive in the batch contributes its negative pairs only (contrastive)
  and nothing (triplet); `frac_anchors_with_positives` reports how often that happens. If the
  batch holds fewer than `num_negatives` images of other labels, the missing ones are skipped.

  Memory per device: O(b x B) scores (plus [b, B, k] hinges for triplet with "all"
  positives), the gathered [B, D] descriptors, and [b, k, D] gathered negatives. Call it
  inside the jitted train step; with Explicit mesh axes, `descriptors` must carry the
  `P(data_axis)` sharding (as the batch does).

  Args:
    descriptors: [B, D] L2-normalised, sharded along `data_axis` of `mesh` (a global
      `jax.Array` under `jit`). Computed in float32.
    labels: [B] int32, sharded like `descriptors`.
    mesh: the device mesh, or None for a single-device computation (same values).
    loss_name: "contrastive" or "triplet".
    margin: contrastive margin (0.7 / 0.85 in cirtorch) or triplet margin (0.1).
    num_negatives: k negatives per anchor (k <= B).
    positives: "all" or "hardest".
    reduction: "sum" (the reference: tuple losses summed over the batch) or "mean" (that sum
      divided by B, i.e. the mean tuple loss).
    data_axis: mesh axis the batch is split over (None: `sharding.data_axis(mesh)`).
    eps: contrastive distance eps (cirtorch's 1e-6).

  Returns:
    (loss, metrics): scalar loss (replicated), and scalar metrics `mean_pos_dist`,
    `mean_neg_dist` (Euclidean, over positive pairs / mined negatives), `active_fraction`
    (contrastive: mined negatives closer than the margin; triplet: triplets with a non-zero
    loss) and `frac_anchors_with_positives`.
  """
  if loss_name not in PAIR_LOSSES:
    raise ValueError(f"loss_name must be one of {PAIR_LOSSES}, got {loss_name!r}")
  if positives not in POSITIVE_MODES:
    raise ValueError(f"positives must be one of {POSITIVE_MODES}, got {positives!r}")
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  body = functools.partial(_in_batch_body, loss_name=loss_name, margin=margin,
                           num_negatives=num_negatives, positives=positives,
                           reduction=reduction, eps=eps)
  return collectives.run_sharded(body, mesh, data_axis, (descriptors, labels), out_specs=P())
