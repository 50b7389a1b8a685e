"""The tiny random ResNet the extraction / export / describe tests share.

`tiny_resnet` is a ResNet-18 layout at width 8 with one block per stage; `random_variables`
fills every variable with non-trivial seeded values (BN statistics and shifts too, so that
padding would leak into a descriptor if a mask were wrong).
"""
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models import retrieval_net


TINY_KWARGS = {"width": 8, "stage_sizes": (1, 1, 1, 1)}


def tiny_resnet(pooling: str = "gem", **kwargs) -> retrieval_net.RetrievalNet:
  return retrieval_net.RetrievalNet(backbone="resnet18", backbone_kwargs=dict(TINY_KWARGS),
                                    pooling=pooling, **kwargs)


def random_variables(model, seed: int = 0, p: float = 3.0, image_size: int = 64):
  """Seeded random variables of `model`, initialised on one [1, image_size, image_size, 3]
  image; GeM's p is `p`."""
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, 3), jnp.uint8))

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "p":
      value = np.full(shape, p)
    elif name == "kernel":
      value = rng.randn(*shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ("var", "scale"):
      value = 0.5 + rng.rand(*shape)
    else:
      value = 0.1 * rng.randn(*shape)
    return np.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
