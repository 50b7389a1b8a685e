"""The one explicit training state, and how it is born (shapes first, then sharded values)."""
from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from retrieval_jax import losses
from retrieval_jax import networks
from retrieval_jax import restore
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.models import retrieval_net
from retrieval_jax.train import optim


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
           total_updates: Optional[int] = None, variables: Optional[Any] = None
           ) -> Tuple[retrieval_net.RetrievalNet, optax.GradientTransformation, TrainState]:
  """Model, optimiser and a replicated TrainState on `mesh` (init runs once, jitted).

  Args:
    config: the experiment config.
    mesh: device mesh; the state is replicated over it.
    num_classes: classes of the margin head (ArcFace / CosFace losses only).
    steps_per_epoch: optimiser updates per epoch for the "exp" lr schedule (None: config's).
    total_updates: optimiser updates of the run (default cosine length).
    variables: the model's starting variables; None: `restore.init_variables` (random init,
      then `config.model.pretrained`).
  """
  model = networks.build_network(config.model)  # a RetrievalNet, or a DelgNet
  rng = jax.random.key(config.seed)
  if variables is None:
    variables = restore.init_variables(model, config.data.image_size, rng,
                                       config.model.pretrained)
  head = make_head(config.loss, num_classes)
  head_params = {}
  if head is not None:
    dim = jax.eval_shape(lambda v: model.apply(
        v, retrieval_net.dummy_images(config.data.image_size)), variables)["descriptor"].shape[-1]
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
