"""Vaccaro et al., "Image retrieval using multi-scale CNN features pooling" (ICMR 2020), Alg. 1.

Semi-hard and hard triplets mined in the global batch, extremely hard ones discarded
(threshold t on ranks), one triplet per class; sharded as `in_batch.py`.
"""
import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from retrieval_jax import losses
from retrieval_jax.mining import collectives
from retrieval_jax.mining import in_batch

Metrics = in_batch.Metrics

VACCARO_MODES = ("mixed", "semi-hard", "hard")


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
  # [b, B]; HIGHEST: TPU bf16 passes / GPU TF32 must not change the ranks mined on.
  sim = jnp.matmul(jax.lax.stop_gradient(desc), jax.lax.stop_gradient(all_desc).T,
                   precision=jax.lax.Precision.HIGHEST)
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
  all_desc = collectives.gather(desc, axis_name)
  all_labels = collectives.gather(labels, axis_name)
  offset = collectives.global_offset(desc.shape[0], axis_name)
  coins = jax.lax.dynamic_slice_in_dim(all_coins, offset, desc.shape[0])
  sel = _vaccaro_select(desc, labels, coins, all_desc, all_labels, offset, t, mode)
  valid = _first_per_class(sel["valid"], labels, offset,
                           collectives.gather(sel["valid"], axis_name), all_labels)
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
  sums = collectives.psum(sums, axis_name)
  loss = sums["loss"] if reduction == "sum" else collectives.safe_div(sums["loss"], sums["num"])
  metrics = {
      "num_triplets": sums["num"],
      "semi_hard_fraction": collectives.safe_div(sums["semi_hard"], sums["num"]),
      "active_fraction": collectives.safe_div(sums["active"], sums["num"]),
      "mean_pos_dist": collectives.safe_div(sums["pos_dist"], sums["num"]),
      "mean_neg_dist": collectives.safe_div(sums["neg_dist"], sums["num"]),
  }
  return loss, metrics


def vaccaro_triplet_loss(descriptors: jnp.ndarray, labels: jnp.ndarray, *,
                         mesh: Optional[Mesh], margin: float = 0.1, t: int,
                         mode: str = "mixed", rng: Optional[jax.Array] = None,
                         coins: Optional[jnp.ndarray] = None, semi_hard_prob: float = 0.5,
                         reduction: str = "mean", data_axis: Optional[str] = None
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
    data_axis: mesh axis of the batch (None: `sharding.data_axis(mesh)`).

  Returns:
    (loss, metrics) with `num_triplets`, `semi_hard_fraction`, `active_fraction`,
    `mean_pos_dist`, `mean_neg_dist`.
  """
  _check_vaccaro(mode, t)
  if reduction not in in_batch.REDUCTIONS:
    raise ValueError(f"reduction must be one of {in_batch.REDUCTIONS}, got {reduction!r}")
  # Drawn for the global batch and given whole to every device (B bools), which slices its
  # own: the coins do not depend on the mesh.
  coins = _vaccaro_coins(rng, coins, descriptors.shape[0], mode, semi_hard_prob)
  body = functools.partial(_vaccaro_body, margin=margin, t=t, mode=mode, reduction=reduction)
  return collectives.run_sharded(body, mesh, data_axis, (descriptors, labels), out_specs=P(),
                      replicated=(coins,))

