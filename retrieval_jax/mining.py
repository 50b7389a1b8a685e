"""Hard-example mining: in-step over the global batch, Vaccaro et al.'s triplets, epoch-level.

Three procedures:

* `in_batch_mined_loss`: the global batch (composed by the sampler of several landmarks with
  several images each) is its own pool. Every device all-gathers the descriptors and labels,
  scores its local anchors against the whole batch ([b, B], memory O(b x B)), masks itself and
  same-label images, takes the top-k most similar negatives and forms pairs (contrastive) or
  triplets with the anchor's positives. Local sums are `psum`-ed. Selection is not
  differentiated (`stop_gradient`), the loss is: gradients flow through the gathered rows, and
  `all_gather`'s transpose (a reduce-scatter) returns them to the devices that own the rows.
* `vaccaro_triplets` / `vaccaro_triplet_loss`: Algorithm 1 of Vaccaro et al., "Image retrieval
  using multi-scale CNN features pooling" (ICMR 2020): semi-hard and hard triplets, extremely
  hard ones discarded (threshold t on ranks), one triplet per class.
* `mine_epoch_negatives`: cnnimageretrieval-pytorch's `create_epoch_tuples` (numpy, host side):
  for each query, pool images by decreasing similarity, never the query's cluster, at most one
  image per cluster.

With `mesh=None` (or a 1-device mesh) the in-step functions compute exactly the same values
without collectives.
"""
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from retrieval_jax import losses

Metrics = Dict[str, jnp.ndarray]

PAIR_LOSSES = ("contrastive", "triplet")
POSITIVE_MODES = ("all", "hardest")
REDUCTIONS = ("sum", "mean")
VACCARO_MODES = ("mixed", "semi-hard", "hard")


# ----------------------------------------------------------------------------------------------
# Shared plumbing: run a per-device body over the mesh, or directly without one.


def _gather(x: jnp.ndarray, axis_name: Optional[str]) -> jnp.ndarray:
  """[b, ...] local rows -> [B, ...] global rows (identity without an axis)."""
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _psum(tree: Any, axis_name: Optional[str]) -> Any:
  if axis_name is None:
    return tree
  return jax.lax.psum(tree, axis_name)


def _global_offset(b: int, axis_name: Optional[str]) -> jnp.ndarray:
  """Global row index of this device's first local row."""
  if axis_name is None:
    return jnp.zeros((), jnp.int32)
  return (jax.lax.axis_index(axis_name) * b).astype(jnp.int32)


def _run_sharded(body: Callable[..., Any], mesh: Optional[Mesh], data_axis: str,
                 args: Tuple[jnp.ndarray, ...], out_specs: Any,
                 replicated: Tuple[jnp.ndarray, ...] = ()) -> Any:
  """Calls `body(*local_args, *replicated, axis_name=...)` under `jax.shard_map`.

  Every element of `args` is split along its first axis over `data_axis`; `replicated` ones
  are given whole to every device. Without a mesh, `body` is called directly.
  """
  if mesh is None:
    return body(*args, *replicated, axis_name=None)
  if data_axis not in mesh.axis_names:
    raise ValueError(f"mesh axes {mesh.axis_names} have no data axis {data_axis!r}")
  n = mesh.shape[data_axis]
  for a in args:
    if a.shape[0] % n:
      raise ValueError(f"global batch {a.shape[0]} is not divisible by the {n} devices of "
                       f"mesh axis {data_axis!r}")
  specs = tuple(P(data_axis) for _ in args) + tuple(P() for _ in replicated)

  def place(a, spec):
    # shard_map refuses inputs whose sharding differs from in_specs on Explicit mesh axes:
    # place concrete inputs, and reshard traced ones whose type says otherwise (e.g. a batch
    # that entered `jit` unsharded). The train step's P(data_axis) batch passes unchanged.
    sharding = jax.sharding.NamedSharding(mesh, spec)
    if not isinstance(a, jax.core.Tracer):
      return jax.device_put(a, sharding)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    current = getattr(jax.typeof(a), "sharding", None)
    if explicit and (current is None or current.spec != sharding.spec):
      return jax.reshard(a, sharding)
    return a

  placed = [place(a, s) for a, s in zip(args + tuple(replicated), specs)]
  fn = jax.shard_map(functools.partial(body, axis_name=data_axis), mesh=mesh, in_specs=specs,
                     out_specs=out_specs)
  return fn(*placed)


def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  return num / jnp.maximum(den, 1.0)


# ----------------------------------------------------------------------------------------------
# In-step hard-negative mining over the global batch.


def _select_in_batch(desc: jnp.ndarray, labels: jnp.ndarray, all_desc: jnp.ndarray,
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
  sim = jax.lax.stop_gradient(desc) @ jax.lax.stop_gradient(all_desc).T  # [b, B]
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
  out = sq_a + sq_x - 2.0 * a @ x.T
  if eps:
    out = out + 2.0 * eps * (jnp.sum(a, -1)[:, None] - jnp.sum(x, -1)[None, :]) + dim * eps**2
  return out


def _in_batch_body(desc: jnp.ndarray, labels: jnp.ndarray, *, axis_name: Optional[str],
                   loss_name: str, margin: float, num_negatives: int, positives: str,
                   reduction: str, eps: float) -> Tuple[jnp.ndarray, Metrics]:
  """Per-device part of `in_batch_mined_loss`; returns globally reduced values."""
  desc = desc.astype(jnp.float32)
  all_desc = _gather(desc, axis_name)
  all_labels = _gather(labels, axis_name)
  offset = _global_offset(desc.shape[0], axis_name)
  sel = _select_in_batch(desc, labels, all_desc, all_labels, offset, num_negatives)
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
  sums = _psum(sums, axis_name)
  loss = sums["loss"] if reduction == "sum" else sums["loss"] / sums["num_anchors"]
  metrics = {
      "mean_pos_dist": _safe_div(sums["pos_dist"], sums["pos_count"]),
      "mean_neg_dist": _safe_div(sums["neg_dist"], sums["neg_count"]),
      "active_fraction": _safe_div(sums["active"], sums["active_den"]),
      "frac_anchors_with_positives": sums["anchors_with_positives"] / sums["num_anchors"],
  }
  return loss, metrics


def in_batch_mined_loss(descriptors: jnp.ndarray, labels: jnp.ndarray, *, mesh: Optional[Mesh],
                        loss_name: str = "contrastive", margin: float = 0.7,
                        num_negatives: int = 5, positives: str = "all", reduction: str = "sum",
                        data_axis: str = "data", eps: float = losses.CONTRASTIVE_EPS
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
    data_axis: mesh axis the batch is split over.
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
  return _run_sharded(body, mesh, data_axis, (descriptors, labels), out_specs=P())


def in_batch_mined_indices(descriptors: jnp.ndarray, labels: jnp.ndarray, *,
                           mesh: Optional[Mesh], num_negatives: int, data_axis: str = "data"
                           ) -> Dict[str, jnp.ndarray]:
  """The selection `in_batch_mined_loss` makes, for inspection and tests.

  Args:
    descriptors: [B, D], sharded as for `in_batch_mined_loss`.
    labels: [B] int32.
    mesh: device mesh or None.
    num_negatives: k.
    data_axis: mesh axis of the batch.

  Returns:
    Dict of global-index arrays sharded along `data_axis`: `neg_idx` [B, k] (most similar
    first), `neg_valid` [B, k], `hardest_pos` [B], `has_pos` [B].
  """

  def body(desc, lab, *, axis_name):
    desc = desc.astype(jnp.float32)
    sel = _select_in_batch(desc, lab, _gather(desc, axis_name), _gather(lab, axis_name),
                           _global_offset(desc.shape[0], axis_name), num_negatives)
    del sel["pos_mask"]
    return sel

  specs = {k: P(data_axis) for k in ("neg_idx", "neg_valid", "hardest_pos", "has_pos")}
  return _run_sharded(body, mesh, data_axis, (descriptors, labels), out_specs=specs)


# ----------------------------------------------------------------------------------------------
# Vaccaro et al. (ICMR 2020), Algorithm 1.


def _vaccaro_select(desc: jnp.ndarray, labels: jnp.ndarray, coins: jnp.ndarray,
                    all_desc: jnp.ndarray, all_labels: jnp.ndarray, offset: jnp.ndarray,
                    t: int, mode: str) -> Dict[str, jnp.ndarray]:
  """Algorithm 1's inner loop for the local queries, vectorised (not differentiated).

  Ranks are 0-based positions in the query's k-NN list, the query itself at position 0
  (the paper's 1-based j = position + 1). With n the first negative:
    case A (semi-hard): n >= 2 (paper: j > 2) and the coin says so -> p = n - 1, which is a
      true positive ranked just before n;
    case B (hard): otherwise p = the first positive ranked after n, kept if p - n < t;
    case C: p - n >= t, or no positive after n -> no triplet (extremely hard).
  Algorithm 1 as printed breaks out of the loop right after `p <- j - 1` (line 16), before
  line 21 appends; the text says case A yields a semi-hard triplet, so the triplet is kept
  (p - n = -1 < t always).

  Returns:
    pos_idx [b], neg_idx [b] global indices, valid [b], semi_hard [b] (case A).
  """
  batch = all_desc.shape[0]
  sim = jax.lax.stop_gradient(desc) @ jax.lax.stop_gradient(all_desc).T  # [b, B]
  query_idx = offset + jnp.arange(desc.shape[0], dtype=jnp.int32)
  ranks = jnp.arange(batch, dtype=jnp.int32)
  # The query is its own nearest neighbour in the paper's list; force it first even if a
  # duplicate descriptor ties with it. Stable sort: ties ranked by batch index.
  sim = jnp.where(ranks[None, :] == query_idx[:, None], jnp.inf, sim)
  order = jnp.argsort(-sim, axis=1, stable=True).astype(jnp.int32)  # [b, B]
  is_pos = all_labels[order] == labels[:, None]  # [b, B], by rank
  has_neg = jnp.any(~is_pos, axis=1)
  n_rank = jnp.argmax(~is_pos, axis=1).astype(jnp.int32)
  after = is_pos & (ranks[None, :] > n_rank[:, None])
  p_hard = jnp.argmax(after, axis=1).astype(jnp.int32)
  hard_ok = has_neg & jnp.any(after, axis=1) & (p_hard - n_rank < t)
  semi_ok = has_neg & (n_rank >= 2)  # and p - n = -1 < t, as t >= 1
  if mode == "mixed":
    take_semi = semi_ok & coins
    take_hard = ~take_semi & hard_ok
  elif mode == "semi-hard":
    take_semi, take_hard = semi_ok, jnp.zeros_like(semi_ok)
  else:  # hard: the coin never chooses case A
    take_semi, take_hard = jnp.zeros_like(semi_ok), hard_ok
  p_rank = jnp.where(take_semi, n_rank - 1, p_hard)
  rows = jnp.arange(desc.shape[0])
  return {"pos_idx": order[rows, p_rank], "neg_idx": order[rows, n_rank],
          "valid": take_semi | take_hard, "semi_hard": take_semi}


def _first_per_class(valid: jnp.ndarray, labels: jnp.ndarray, offset: jnp.ndarray,
                     all_valid: jnp.ndarray, all_labels: jnp.ndarray) -> jnp.ndarray:
  """Line 28, "keep just one triplet per class": the valid query of lowest batch index."""
  batch = all_valid.shape[0]
  query_idx = offset + jnp.arange(valid.shape[0], dtype=jnp.int32)
  earlier = jnp.arange(batch, dtype=jnp.int32)[None, :] < query_idx[:, None]
  taken = jnp.any(earlier & all_valid[None, :] & (all_labels[None, :] == labels[:, None]), 1)
  return valid & ~taken


def _vaccaro_coins(rng: Optional[jax.Array], coins: Optional[jnp.ndarray], n: int, mode: str,
                   semi_hard_prob: float) -> jnp.ndarray:
  if coins is not None:
    return jnp.asarray(coins, jnp.bool_)
  if mode == "mixed":
    if rng is None:
      raise ValueError("mode='mixed' needs `rng` (or explicit `coins`)")
    return jax.random.bernoulli(rng, semi_hard_prob, (n,))
  return jnp.zeros((n,), jnp.bool_)  # unused by the other modes


def _check_vaccaro(mode: str, t: int) -> None:
  if mode not in VACCARO_MODES:
    raise ValueError(f"mode must be one of {VACCARO_MODES}, got {mode!r}")
  if t < 1:
    raise ValueError(f"t must be a positive rank difference, got {t}")


def vaccaro_triplets(descriptors: jnp.ndarray, labels: jnp.ndarray, *, t: int,
                     mode: str = "mixed", rng: Optional[jax.Array] = None,
                     coins: Optional[jnp.ndarray] = None, semi_hard_prob: float = 0.5,
                     one_per_class: bool = True) -> Dict[str, jnp.ndarray]:
  """Algorithm 1 of Vaccaro et al. on a whole (e.g. mining or gathered global) batch.

  Every image is tried as a query (in batch order); `valid` marks the queries whose triplet
  survives, after keeping one triplet per class (the first valid query of each label). The
  paper mines a batch of 2048 images of 512 landmarks and gets about 250 triplets.

  Args:
    descriptors: [N, D] descriptors (L2-normalised; ranking by dot product = by distance).
    labels: [N] int class ids.
    t: the threshold on p - n (ranks) beyond which a hard triplet is "extremely hard" and
      discarded. Not given in the paper.
    mode: "mixed" (the paper: case A with probability `semi_hard_prob` when possible),
      "semi-hard" (case A triplets only), "hard" (case B only: the coin never picks A).
    rng: PRNG key for the coins of "mixed".
    coins: optional [N] bool, the coin of each query (overrides `rng`).
    semi_hard_prob: probability of case A in "mixed" (0.5 in the paper).
    one_per_class: apply line 28 (False: every query's triplet, for inspection).

  Returns:
    `triplets` [N, 3] int32 (query, positive, negative) indices, `valid` [N] bool,
    `semi_hard` [N] bool (case A among the valid ones).
  """
  _check_vaccaro(mode, t)
  n = descriptors.shape[0]
  desc = descriptors.astype(jnp.float32)
  coins = _vaccaro_coins(rng, coins, n, mode, semi_hard_prob)
  offset = jnp.zeros((), jnp.int32)
  sel = _vaccaro_select(desc, labels, coins, desc, labels, offset, t, mode)
  valid = sel["valid"]
  if one_per_class:
    valid = _first_per_class(valid, labels, offset, valid, labels)
  triplets = jnp.stack([jnp.arange(n, dtype=jnp.int32), sel["pos_idx"], sel["neg_idx"]], 1)
  return {"triplets": triplets, "valid": valid, "semi_hard": sel["semi_hard"] & valid}


def _vaccaro_body(desc: jnp.ndarray, labels: jnp.ndarray, all_coins: jnp.ndarray, *,
                  axis_name: Optional[str], margin: float, t: int, mode: str, reduction: str
                  ) -> Tuple[jnp.ndarray, Metrics]:
  desc = desc.astype(jnp.float32)
  all_desc = _gather(desc, axis_name)
  all_labels = _gather(labels, axis_name)
  offset = _global_offset(desc.shape[0], axis_name)
  coins = jax.lax.dynamic_slice_in_dim(all_coins, offset, desc.shape[0])
  sel = _vaccaro_select(desc, labels, coins, all_desc, all_labels, offset, t, mode)
  valid = _first_per_class(sel["valid"], labels, offset, _gather(sel["valid"], axis_name),
                           all_labels)
  per_triplet = losses.triplet_loss(desc, all_desc[sel["pos_idx"]], all_desc[sel["neg_idx"]],
                                    margin)  # [b]
  sg = jax.lax.stop_gradient
  sums = {
      "loss": jnp.sum(jnp.where(valid, per_triplet, 0.0)),
      "num": jnp.sum(valid).astype(jnp.float32),
      "semi_hard": jnp.sum(valid & sel["semi_hard"]).astype(jnp.float32),
      "active": jnp.sum(valid & (sg(per_triplet) > 0)).astype(jnp.float32),
      "pos_dist": jnp.sum(jnp.where(valid, jnp.linalg.norm(
          sg(desc - all_desc[sel["pos_idx"]]), axis=-1), 0.0)),
      "neg_dist": jnp.sum(jnp.where(valid, jnp.linalg.norm(
          sg(desc - all_desc[sel["neg_idx"]]), axis=-1), 0.0)),
  }
  sums = _psum(sums, axis_name)
  loss = sums["loss"] if reduction == "sum" else _safe_div(sums["loss"], sums["num"])
  metrics = {
      "num_triplets": sums["num"],
      "semi_hard_fraction": _safe_div(sums["semi_hard"], sums["num"]),
      "active_fraction": _safe_div(sums["active"], sums["num"]),
      "mean_pos_dist": _safe_div(sums["pos_dist"], sums["num"]),
      "mean_neg_dist": _safe_div(sums["neg_dist"], sums["num"]),
  }
  return loss, metrics


def vaccaro_triplet_loss(descriptors: jnp.ndarray, labels: jnp.ndarray, *,
                         mesh: Optional[Mesh], margin: float = 0.1, t: int,
                         mode: str = "mixed", rng: Optional[jax.Array] = None,
                         coins: Optional[jnp.ndarray] = None, semi_hard_prob: float = 0.5,
                         reduction: str = "mean", data_axis: str = "data"
                         ) -> Tuple[jnp.ndarray, Metrics]:
  """Triplet loss on the global batch's Vaccaro triplets (`vaccaro_triplets`), sharded.

  Each device mines the triplets of its local queries against the gathered batch; the
  one-per-class rule sees every device's valid flags (a second, [B] bool, all-gather). The
  coins are drawn for the global batch from `rng`, so the result does not depend on the mesh.

  Args:
    descriptors: [B, D] L2-normalised, sharded along `data_axis`.
    labels: [B] int32, sharded likewise.
    mesh: device mesh, or None.
    margin: alpha of `losses.triplet_loss` (0.1 in the paper).
    t: extremely-hard threshold on rank differences (see `vaccaro_triplets`).
    mode: "mixed", "semi-hard" or "hard".
    rng: PRNG key for "mixed" (e.g. `jax.random.fold_in(rng, step)`).
    coins: optional explicit [B] bool coins.
    semi_hard_prob: probability of case A in "mixed".
    reduction: "mean" over the kept triplets (their number varies) or "sum".
    data_axis: mesh axis of the batch.

  Returns:
    (loss, metrics) with `num_triplets`, `semi_hard_fraction`, `active_fraction`,
    `mean_pos_dist`, `mean_neg_dist`.
  """
  _check_vaccaro(mode, t)
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  # Drawn for the global batch and given whole to every device (B bools), which slices its
  # own: the coins do not depend on the mesh.
  coins = _vaccaro_coins(rng, coins, descriptors.shape[0], mode, semi_hard_prob)
  body = functools.partial(_vaccaro_body, margin=margin, t=t, mode=mode, reduction=reduction)
  return _run_sharded(body, mesh, data_axis, (descriptors, labels), out_specs=P(),
                      replicated=(coins,))


# ----------------------------------------------------------------------------------------------
# Dispatch by config.loss.name.


def get_batch_loss(name: str) -> Callable[..., Tuple[jnp.ndarray, Metrics]]:
  """`fn(descriptors, labels, *, mesh, margin, **kwargs) -> (loss, metrics)` for a mined loss.

  Args:
    name: "contrastive", "triplet" (→ `in_batch_mined_loss`) or "vaccaro_triplet"
      (→ `vaccaro_triplet_loss`). Margin-softmax losses need a head: see `losses.get_loss`.
  """
  spec = losses.get_loss(name)
  if spec.family == "pair":
    return functools.partial(in_batch_mined_loss, loss_name=name)
  if spec.family == "vaccaro":
    return vaccaro_triplet_loss
  raise ValueError(f"loss {name!r} is a {spec.family} loss, not a mined batch loss")


# ----------------------------------------------------------------------------------------------
# Epoch-level mining (cnnimageretrieval-pytorch `create_epoch_tuples`), host side.


_jit_scores = jax.jit(lambda q, pool: q @ pool.T)


def _similarities(query_desc: np.ndarray, pool_desc: np.ndarray, use_jax: bool) -> np.ndarray:
  """[Nq, Np] dot products."""
  if use_jax:
    return np.asarray(_jit_scores(jnp.asarray(query_desc, jnp.float32),
                                  jnp.asarray(pool_desc, jnp.float32)))
  return np.asarray(query_desc) @ np.asarray(pool_desc).T


def _ranked_candidates(scores: np.ndarray, k: int) -> np.ndarray:
  """Pool indices of the k best scores (plus ties at the k-th), by score desc, then index."""
  if k >= scores.shape[0]:
    cand = np.arange(scores.shape[0])
  else:
    kth = -np.partition(-scores, k - 1)[k - 1]
    # Keeping every tie of the k-th score makes the order equal to a full stable sort's.
    cand = np.nonzero(scores >= kth)[0]
  return cand[np.lexsort((cand, -scores[cand]))]


def mine_epoch_negatives(query_desc: np.ndarray, pool_desc: np.ndarray,
                         query_clusters: np.ndarray, pool_clusters: np.ndarray,
                         num_negatives: int, pool_topk: Optional[int] = None,
                         use_jax: bool = False, chunk_size: int = 1024) -> np.ndarray:
  """Hard negatives of each query from a pool, as cirtorch's `create_epoch_tuples`.

  For each query, pool images are visited by decreasing similarity (ties: lower pool index
  first); an image is taken unless its cluster is the query's or already taken, until
  `num_negatives`. The same greedy result is computed per query with a bounded candidate list
  that grows only when too few clusters turned up.

  Args:
    query_desc: [Nq, D] query descriptors.
    pool_desc: [Np, D] negative-pool descriptors.
    query_clusters: [Nq] int cluster (3D model / landmark) ids of the queries.
    pool_clusters: [Np] int cluster ids of the pool images.
    num_negatives: negatives per query.
    pool_topk: if set, look only at the `pool_topk` most similar pool images (bounds the
      work); None searches the whole pool as the reference does.
    use_jax: compute the similarities with a jitted float32 matmul (accelerator) instead of
      numpy.
    chunk_size: queries scored at once ([chunk_size, Np] scores in memory).

  Returns:
    [Nq, num_negatives] int64 indices into the pool, hardest first; -1 where the searched
    pool holds fewer distinct admissible clusters (the reference would fail there).
  """
  query_clusters = np.asarray(query_clusters)
  pool_clusters = np.asarray(pool_clusters)
  num_pool = pool_desc.shape[0]
  limit = num_pool if pool_topk is None else min(pool_topk, num_pool)
  out = np.full((query_desc.shape[0], num_negatives), -1, np.int64)
  if num_negatives == 0:
    return out
  for start in range(0, query_desc.shape[0], chunk_size):
    scores = _similarities(query_desc[start:start + chunk_size], pool_desc, use_jax)
    for row, q_scores in enumerate(scores):
      q_cluster = query_clusters[start + row]
      k = min(limit, max(8 * num_negatives, 64))
      while True:
        ranked = _ranked_candidates(q_scores, k)[:limit]
        clusters = pool_clusters[ranked]
        admissible = clusters != q_cluster
        ranked, clusters = ranked[admissible], clusters[admissible]
        _, first = np.unique(clusters, return_index=True)  # first occurrence = most similar
        chosen = ranked[np.sort(first)][:num_negatives]
        if chosen.shape[0] == num_negatives or k >= limit:
          break
        k = min(limit, 4 * k)
      out[start + row, :chosen.shape[0]] = chosen
  return out
