"""The compiled training step: forward, loss, update; one function per input kind.

Two input kinds (`config.train.mining`):
  * "in_batch": {"image": uint8 [B, S, S, 3], "label": int32 [B]}, a class-balanced (or
    shuffled) batch. The loss family of `config.loss.name` decides what happens:
      "pair"            hard negatives mined in the global batch
                        (`mining.in_batch.in_batch_mined_loss`);
      "vaccaro"         Vaccaro et al.'s triplets (`mining.vaccaro.vaccaro_triplet_loss`);
      "margin_softmax"  ArcFace / CosFace logits from `state.head` (`losses.MarginHead`).
  * "epoch": {"image": uint8 [T, 2 + N, S, S, 3], "mask": bool [T, 2 + N, S, S],
    "weight": float32 [T]}, tuples (q, p, n_1..n_N) mined once per epoch (data/tuples.py);
    the reference's per-tuple loss (`LossSpec.tuple_fn`, e.g. `losses.contrastive_tuple_loss`)
    summed over the tuples, padding tuples weighted 0.

The loss family dispatch is `FAMILY_LOSSES`, one entry per `losses.FAMILIES` member.
With a local head (`model.local_head="delg"`, a DelgNet), the in-batch loss adds DELG's
local terms (`local.heads.local_loss`: attention CE + reconstruction MSE, weighted by
`loss.local_attention_weight` / `loss.local_reconstruction_weight`); they reach only the
local head.

Everything is a pure function of (state, batch): randomness (Vaccaro's coins) comes from
`fold_in(key(seed), state.step)`.
"""
import functools
from typing import Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import optax

from retrieval_jax import losses
from retrieval_jax import networks
from retrieval_jax import registry
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.local import heads as local_heads
from retrieval_jax.mining import collectives
from retrieval_jax.mining import in_batch
from retrieval_jax.mining import vaccaro
from retrieval_jax.train.state import TrainState

Metrics = Dict[str, jnp.ndarray]


def _forward(params, batch_stats, images, mask, *, model, train, labels=None):
  """(model outputs, new batch_stats); `labels` reach a DelgNet's attention classifier."""
  extra = {} if labels is None else {"labels": labels}
  out, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, mask,
                             train=train, mutable=["batch_stats"], **extra)
  return out, updates.get("batch_stats", batch_stats)


def _local_loss(out, labels, loss, metrics, loss_config):
  """DELG: the global loss plus the local head's (attention CE, reconstruction MSE), which
  `heads.LocalHead` stops at the trunk; the terms are logged apart."""
  local = local_heads.local_loss(
      out, out["stage"], labels, attention_weight=loss_config.local_attention_weight,
      reconstruction_weight=loss_config.local_reconstruction_weight)
  metrics = dict(metrics, global_loss=loss, attention_loss=local["attention_loss"],
                 reconstruction_loss=local["reconstruction_loss"])
  return loss + local["local_loss"], metrics


def _tuple_loss(desc: jnp.ndarray, weight: jnp.ndarray, loss_config
                ) -> Tuple[jnp.ndarray, Metrics]:
  """Per-tuple reference loss on descriptors [T, 2 + N, D], weighted by [T], reduced."""
  spec = losses.get_loss(loss_config.name)
  if spec.tuple_fn is None:
    raise ValueError(f"train.mining='epoch' trains the reference's tuple losses "
                     f"(contrastive, triplet), not {loss_config.name!r}")
  q, p, n = desc[:, 0], desc[:, 1], desc[:, 2:]
  per = jax.vmap(functools.partial(spec.tuple_fn, margin=loss_config.margin))(q, p, n)
  total = jnp.sum(per * weight)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  loss = total if loss_config.reduction == "sum" else total / count
  sg = jax.lax.stop_gradient
  d_pos = losses.euclidean_distance(sg(q), sg(p))  # [T]
  d_neg = losses.euclidean_distance(sg(q)[:, None], sg(n))  # [T, N]
  if loss_config.name == "contrastive":
    active = d_neg < loss_config.margin  # negatives inside the margin
  else:
    active = d_pos[:, None] ** 2 - d_neg ** 2 + loss_config.margin > 0  # non-zero triplets
  metrics = {"mean_pos_dist": jnp.sum(d_pos * weight) / count,
             "mean_neg_dist": jnp.sum(d_neg.mean(-1) * weight) / count,
             "active_fraction": jnp.sum(jnp.mean(active, -1) * weight) / count}
  return loss, metrics


# (desc [B, D], labels [B], *, loss_config, mesh, head, head_params, rng) -> (loss, metrics),
# one per loss family of `losses.FAMILIES`.
FAMILY_LOSSES: registry.Registry = registry.Registry("loss family")


def _mining_axes(mesh, loss_config):
  """The in-step mining pool: the global batch, or one slice's rows (`loss.mining_scope`)."""
  return collectives.mining_axes(mesh, loss_config.get("mining_scope", "global"))


@FAMILY_LOSSES.register("pair")
def _pair_loss(desc, labels, *, loss_config, mesh, head, head_params, rng):
  del head, head_params, rng
  return in_batch.in_batch_mined_loss(
      desc, labels, mesh=mesh, loss_name=loss_config.name, margin=loss_config.margin,
      num_negatives=loss_config.num_negatives, positives=loss_config.positives,
      reduction=loss_config.reduction, data_axis=_mining_axes(mesh, loss_config))


@FAMILY_LOSSES.register("vaccaro")
def _vaccaro_loss(desc, labels, *, loss_config, mesh, head, head_params, rng):
  del head, head_params
  return vaccaro.vaccaro_triplet_loss(
      desc, labels, mesh=mesh, margin=loss_config.margin, t=int(loss_config.vaccaro_t),
      mode=loss_config.vaccaro_mode, rng=rng,
      semi_hard_prob=float(loss_config.semi_hard_prob), reduction=loss_config.reduction,
      data_axis=_mining_axes(mesh, loss_config))


@FAMILY_LOSSES.register("margin_softmax")
def _margin_softmax_loss(desc, labels, *, loss_config, mesh, head, head_params, rng):
  del loss_config, mesh, rng
  logits = head.apply({"params": head_params}, desc, labels)
  loss = losses.margin_softmax_loss(logits, labels)
  plain = head.apply({"params": head_params}, jax.lax.stop_gradient(desc), None)
  return loss, {"accuracy": jnp.mean(jnp.argmax(plain, -1) == labels)}


def loss_and_metrics(params, batch_stats, batch, *, model, loss_config, mesh, train=True,
                     head=None, head_params=None, step=None, seed: int = 0):
  """(loss, (metrics, new batch_stats)) of one global batch; pure.

  Args:
    params, batch_stats: the model's variables.
    batch: see the module docstring; "mask" optional for in-batch inputs.
    model: the RetrievalNet.
    loss_config: `config.loss`.
    mesh: device mesh (the mined losses gather over its batch axis).
    train: BatchNorm mode flag.
    head, head_params: the margin head and its params ("margin_softmax" losses).
    step: int32 train step (seeds Vaccaro's coins).
    seed: base seed of that randomness.
  """
  images, mask = batch["image"], batch.get("mask")
  if images.ndim == 5:  # Tuples [T, 2 + N, S, S, 3] -> images [T * (2 + N), S, S, 3].
    t, k = images.shape[:2]
    out, new_stats = _forward(params, batch_stats, images.reshape((t * k,) + images.shape[2:]),
                              mask.reshape((t * k,) + mask.shape[2:]), model=model,
                              train=train)
    if "attention_logits" in out:
      raise ValueError("model.local_head trains on labelled batches: use "
                       "train.mining='in_batch' (epoch tuples carry no labels)")
    desc = out["descriptor"]
    loss, metrics = _tuple_loss(desc.astype(jnp.float32).reshape(t, k, -1), batch["weight"],
                                loss_config)
    return loss, (metrics, new_stats)

  local = networks.has_local_head(model)
  out, new_stats = _forward(params, batch_stats, images, mask, model=model, train=train,
                            labels=batch["label"] if local else None)
  desc = out["descriptor"]
  family = losses.get_loss(loss_config.name).family
  rng = jax.random.fold_in(jax.random.key(seed), jnp.zeros((), jnp.int32) if step is None
                           else step)
  fn: Callable[..., Tuple[jnp.ndarray, Metrics]] = FAMILY_LOSSES.get(family)
  loss, metrics = fn(desc, batch["label"], loss_config=loss_config, mesh=mesh, head=head,
                     head_params=head_params, rng=rng)
  if local:
    loss, metrics = _local_loss(out, batch["label"], loss, metrics, loss_config)
  return loss, (metrics, new_stats)


def train_step(state: TrainState, batch: Dict[str, jnp.ndarray], *, model, tx, loss_config,
               mesh, head=None, seed: int = 0) -> Tuple[TrainState, Metrics]:
  """One optimiser (micro-)step. Metrics: loss, grad_norm, param_norm, lr-free extras."""

  def objective(trainable, batch_stats):
    if state.head:
      params, head_params = trainable["model"], trainable["head"]
    else:
      params, head_params = trainable, None
    return loss_and_metrics(params, batch_stats, batch, model=model, loss_config=loss_config,
                            mesh=mesh, head=head, head_params=head_params, step=state.step,
                            seed=seed)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  (loss, (metrics, batch_stats)), grads = grad_fn(state.trainable, state.batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(trainable))
  new = state.replace_trainable(trainable)
  return new.replace(step=state.step + 1, batch_stats=batch_stats,
                     opt_state=opt_state), metrics


def compile_train_step(model, tx, loss_config, mesh, state: TrainState, *, head=None,
                       seed: int = 0, max_traces: Optional[int] = None):
  """jit with explicit shardings: state replicated (donated), batch split over the batch axis.

  Args:
    model, tx, loss_config, mesh: see `train_step`.
    state: a state with the shardings to compile for.
    head: the margin head module, if the loss has one.
    seed: base seed of in-step randomness.
    max_traces: if set, `chex.assert_max_traces(n=max_traces)`: a retrace (a shape or
      dtype change, i.e. a recompile) raises instead of silently costing minutes.
  """
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  batch_sharding = sharding_lib.batch_sharding(mesh)

  def step_fn(state, batch):
    return train_step(state, batch, model=model, tx=tx, loss_config=loss_config, mesh=mesh,
                      head=head, seed=seed)

  if max_traces:
    # chex counts traces per call site of this function (its footprint), process-wide.
    step_fn = chex.assert_max_traces(step_fn, n=max_traces)
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))
