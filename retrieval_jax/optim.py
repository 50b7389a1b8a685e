"""optax optimiser from `config.optim`: Adam with the reference's schedule and param groups.

Param groups (by path): pooling params ("pool/...": GeM p) get `pool_lr_mult` x lr and no
weight decay, as cnnimageretrieval-pytorch does; paths matching `freeze` (a regex), and
BatchNorm scale/bias when `bn_mode == "frozen"`, are not updated.
"""
import re
from typing import Any

from flax import traverse_util
import jax.numpy as jnp
import optax


def learning_rate_schedule(c) -> optax.Schedule:
  """The reference decays lr by exp(-0.01) per epoch; also cosine or constant, with warmup."""
  if c.schedule == "exp":
    base = lambda step: c.lr * jnp.exp(-0.01 * (step // c.steps_per_epoch))
  elif c.schedule == "cosine":
    base = optax.cosine_decay_schedule(c.lr, max(1, c.get("decay_steps", 100_000)))
  elif c.schedule == "constant":
    base = optax.constant_schedule(c.lr)
  else:
    raise ValueError(f"optim.schedule must be exp, cosine or constant, got {c.schedule!r}")
  if c.warmup_steps:
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, c.warmup_steps), base],
                                [c.warmup_steps])
  return base


def param_labels(params: Any, freeze: str = "", freeze_bn: bool = False) -> Any:
  """'frozen' | 'pool' | 'default' for every param leaf, by its '/'-joined path."""
  pattern = re.compile(freeze) if freeze else None

  def label(path):
    name = "/".join(path)
    if pattern is not None and pattern.search(name):
      return "frozen"
    if freeze_bn and "backbone" in path and any(p == "bn" or p.startswith("bn") for p in path):
      return "frozen"
    if path and path[0].startswith("pool"):
      return "pool"
    return "default"

  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: label(k) for k in flat})


def _adam(lr, c, weight_decay: float) -> optax.GradientTransformation:
  chain = []
  if c.grad_clip:
    chain.append(optax.clip_by_global_norm(c.grad_clip))
  if c.name == "adam" and not c.decoupled_weight_decay:
    # torch.optim.Adam(weight_decay=wd) adds wd * param to the gradient (coupled L2).
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay))
    chain.append(optax.scale_by_adam())
  elif c.name in ("adam", "adamw"):
    chain.append(optax.scale_by_adam())
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay))
  elif c.name == "sgd":
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay))
    chain.append(optax.trace(decay=c.get("momentum", 0.9)))
  else:
    raise ValueError(f"optim.name must be adam, adamw or sgd, got {c.name!r}")
  chain.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*chain)


def make_optimizer(c, params: Any, bn_mode: str = "frozen_stats") -> optax.GradientTransformation:
  """The full transformation for `params` from `config.optim`."""
  schedule = learning_rate_schedule(c)
  pool_schedule = lambda step: c.pool_lr_mult * schedule(step)
  return optax.multi_transform(
      {"default": _adam(schedule, c, c.weight_decay),
       "pool": _adam(pool_schedule, c, 0.0),
       "frozen": optax.set_to_zero()},
      param_labels(params, c.freeze, freeze_bn=(bn_mode == "frozen")))
