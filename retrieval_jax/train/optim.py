"""optax optimiser from `config.optim`: Adam with the reference's schedule and param groups.

Param groups, by path in the params tree:
  * "pool": pooling params (`pool/...`, e.g. GeM p) get `pool_lr_mult` x lr and no weight
    decay, as cnnimageretrieval-pytorch's `{'params': model.pool.parameters(), 'lr': lr * 10,
    'weight_decay': 0}`;
  * "frozen": paths matching `freeze` (a regex over '/'-joined paths), and BatchNorm
    scale/bias when `bn_mode == "frozen"`, are not updated (zero update, no optimiser state);
  * "head": a classification head trained beside the model (ArcFace/CosFace), and a
    DELG network's local head (`local_head/...`), lr x `head_lr_mult`, with weight decay;
  * "default": everything else.

Weight decay is coupled (torch.optim.Adam(weight_decay=wd): wd * param added to the gradient
before the moments, the reference's choice) or decoupled (AdamW: lr * wd * param added to the
step), `optim.decoupled_weight_decay`.

Gradient accumulation (`optim.accumulate_steps = k`) wraps everything in `optax.MultiSteps`:
the gradients of k train steps are *summed* (the reference calls `loss.backward()` once per
tuple of a batch and steps once), then one update is made; the schedule counts updates.
"""
import re
from typing import Any, Optional

from flax import traverse_util
import jax.numpy as jnp
import optax

LABELS = ("default", "pool", "head", "frozen")


def learning_rate_schedule(c, steps_per_epoch: Optional[int] = None,
                           total_steps: Optional[int] = None) -> optax.Schedule:
  """lr as a function of the optimiser update count.

  "exp" is the reference's `ExponentialLR(gamma=exp(-0.01))` stepped once per epoch:
  `lr * exp(-0.01 * epoch)` with `epoch = update // steps_per_epoch` (as under PyTorch 1.0, the
  reference's tested version, where epoch 0 runs at the base lr). "cosine" decays to
  `lr * cosine_alpha` over `decay_steps` (0: the whole run); "constant". A linear warmup from
  0 over `warmup_steps` precedes any of them (the base schedule then starts at its step 0).

  Args:
    c: `config.optim`.
    steps_per_epoch: optimiser updates per epoch; None takes `c.steps_per_epoch`.
    total_steps: optimiser updates of the whole run (the default cosine length).
  """
  spe = int(steps_per_epoch or c.steps_per_epoch)
  if c.schedule == "exp":
    base = lambda step: c.lr * jnp.exp(-0.01 * (step // max(spe, 1)))
  elif c.schedule == "cosine":
    decay = int(c.decay_steps or total_steps or 100_000) - int(c.warmup_steps)
    base = optax.cosine_decay_schedule(c.lr, max(1, decay), alpha=c.cosine_alpha)
  elif c.schedule == "constant":
    base = optax.constant_schedule(c.lr)
  else:
    raise ValueError(f"optim.schedule must be exp, cosine or constant, got {c.schedule!r}")
  if c.warmup_steps:
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, c.warmup_steps), base],
                                [c.warmup_steps])
  return base


def _bn_modules(batch_stats: Any):
  """Module paths (tuples) that hold BatchNorm running statistics."""
  if not batch_stats:
    return set()
  return {k[:-1] for k in traverse_util.flatten_dict(batch_stats)}


def param_labels(params: Any, freeze: str = "", freeze_bn: bool = False,
                 batch_stats: Any = None) -> Any:
  """One of `LABELS` for every leaf of `params` (a model params tree, or {"model", "head"}).

  BatchNorm params are recognised as those of a module that also has `batch_stats` (when
  given), else by a module name starting with "bn".
  """
  pattern = re.compile(freeze) if freeze else None
  if isinstance(params, dict) and set(params) == {"model", "head"}:
    model_labels = param_labels(params["model"], freeze, freeze_bn, batch_stats)
    flat_head = traverse_util.flatten_dict(params["head"]) if params["head"] else {}
    head_labels = traverse_util.unflatten_dict(
        {k: ("frozen" if pattern is not None and pattern.search("head/" + "/".join(k))
             else "head") for k in flat_head}) if flat_head else {}
    return {"model": model_labels, "head": head_labels}
  bn_modules = _bn_modules(batch_stats)

  def is_bn(path):
    if batch_stats:
      return path[:-1] in bn_modules
    return any(p == "bn" or p.startswith("bn") for p in path[:-1])

  def label(path):
    name = "/".join(path)
    if pattern is not None and pattern.search(name):
      return "frozen"
    if freeze_bn and is_bn(path):
      return "frozen"
    if path and path[0].startswith("pool"):
      return "pool"
    if path and path[0] == "local_head":  # DELG's fresh local head: a head like the margin's
      return "head"
    return "default"

  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: label(k) for k in flat})


def _base(lr, c, weight_decay: float) -> optax.GradientTransformation:
  """One param group's chain: [clip], Adam (coupled or decoupled wd) or SGD, then -lr."""
  chain = []
  if c.name == "adam" and not c.decoupled_weight_decay:
    # torch.optim.Adam(weight_decay=wd) adds wd * param to the gradient (coupled L2).
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay))
    chain.append(optax.scale_by_adam())
  elif c.name in ("adam", "adamw"):
    # AdamW: the decay is added to the Adam direction, then scaled by lr with it.
    chain.append(optax.scale_by_adam())
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay))
  elif c.name == "sgd":
    # torch.optim.SGD: g + wd * p, then momentum buffer, then -lr.
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay))
    chain.append(optax.trace(decay=c.momentum))
  else:
    raise ValueError(f"optim.name must be adam, adamw or sgd, got {c.name!r}")
  chain.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*chain)


def make_optimizer(c, params: Any, bn_mode: str = "frozen_stats", batch_stats: Any = None,
                   steps_per_epoch: Optional[int] = None,
                   total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """The full transformation for `params` from `config.optim`.

  Args:
    c: `config.optim`.
    params: the params tree the optimiser updates (model params, or {"model": ..., "head":
      ...} when a classification head trains beside the model); only its structure is used.
    bn_mode: the trunk's BatchNorm mode; "frozen" keeps BN scale/shift fixed.
    batch_stats: the model's batch_stats (identifies BatchNorm modules).
    steps_per_epoch: optimiser updates per epoch for the "exp" schedule (None: config's).
    total_steps: optimiser updates of the run (default cosine length).

  Returns:
    An optax transformation; `MultiSteps`-wrapped when `accumulate_steps > 1`.
  """
  schedule = learning_rate_schedule(c, steps_per_epoch, total_steps)
  scaled = lambda mult: (lambda step: mult * schedule(step))
  groups = {"default": _base(schedule, c, c.weight_decay),
            "pool": _base(scaled(c.pool_lr_mult), c, 0.0),
            "head": _base(scaled(c.head_lr_mult), c, c.weight_decay),
            "frozen": optax.set_to_zero()}
  tx = optax.multi_transform(groups, param_labels(params, c.freeze, bn_mode == "frozen",
                                                  batch_stats))
  if c.grad_clip:
    # Clipping acts on the whole (accumulated) gradient, before any group's weight decay.
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), tx)
  k = int(c.accumulate_steps)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k, use_grad_mean=False)
  return tx
