"""The compiled training step: forward, in-step mined loss over the global batch, update."""
import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from retrieval_jax import mining
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.train_state import TrainState


def loss_and_metrics(params, batch_stats, batch, *, model, loss_config, mesh, train=True):
  """(loss, (metrics, new batch_stats)) of one global batch; pure."""
  out, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                             train=train, mutable=["batch_stats"])
  loss, metrics = mining.in_batch_mined_loss(
      out["descriptor"], batch["label"], mesh=mesh, loss_name=loss_config.name,
      margin=loss_config.margin, num_negatives=loss_config.num_negatives,
      positives=loss_config.positives, reduction=loss_config.reduction,
      data_axis=sharding_lib.DATA_AXIS)
  return loss, (metrics, updates.get("batch_stats", batch_stats))


def train_step(state: TrainState, batch: Dict[str, jnp.ndarray], *, model, tx, loss_config,
               mesh) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
  grad_fn = jax.value_and_grad(
      functools.partial(loss_and_metrics, model=model, loss_config=loss_config, mesh=mesh),
      has_aux=True)
  (loss, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), metrics


def compile_train_step(model, tx, loss_config, mesh, state: TrainState):
  """jit with explicit shardings: state replicated (donated), batch sharded over "data"."""
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_config=loss_config, mesh=mesh),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
      donate_argnums=(0,))
