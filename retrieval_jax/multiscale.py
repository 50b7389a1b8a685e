"""How per-scale descriptors become one: the multi-scale combinations, by name.

`config.extract.multiscale_combine` picks an entry of `COMBINES`; adding a combination is
one entry. Each entry says whether it fuses feature maps before pooling (early fusion,
Seddati et al.: `extract.make_fused_describe_fn`) or combines per-scale descriptors, and
how its exponent p follows from the network. Per-scale descriptors are combined as
cnnimageretrieval-pytorch's `extract_ms`: `v = L2((mean_s v_s^p)^(1/p))`, written once
here for numpy (the extraction, in float64 chunks) and jax (the exported function):
`power_term` of each scale is summed, `finish` turns the sum into the descriptor.
SuperGlobal's scale-GeM ("sgem", "sgem_power"; `models/superglobal.scale_gem`) instead
combines all scales of an image at once (`Combine.scale_gem`), from the scales made on the
device (`extract.multiscale_resize="interpolate"`).
"""
import dataclasses
from typing import Any, Callable, Optional, Tuple

import numpy as np

from retrieval_jax import registry


def reference_p(variables, pooling: Optional[str] = None) -> Optional[float]:
  """cnnimageretrieval-pytorch's test.py exponent (`msp = net.pool.p` iff pooling == 'gem'
  and not regional and not whitening), or None for the plain mean.

  The learned GeM p, but only for a plain GeM network without whitening (whitened
  descriptors can be negative, where a fractional power is undefined); every other
  network, regional poolings with GeM regions included, uses the mean (msp=1).

  Args:
    variables: the model's variables ({"params": ...}).
    pooling: the model's `config.model.pooling` name; any name other than "gem" gives
      None (None: decided from the variables alone).
  Returns:
    The mean of `params["pool"]["p"]` as a float, or None.
  """
  if pooling is not None and pooling != "gem":
    return None
  params = variables["params"]
  if "whiten" in params:
    return None
  pool = params.get("pool", {})
  if "p" not in pool:
    return None
  return float(np.mean(np.asarray(pool["p"])))


@dataclasses.dataclass(frozen=True)
class Combine:
  """One multi-scale combination.

  Attributes:
    exponent: (variables, pooling name) -> p of `power_term` / `finish`, None for the mean.
    fuses_maps: the scales' feature maps are fused before pooling (no per-scale
      descriptors; `exponent` is not used).
    scale_gem: SuperGlobal's scale-GeM of an image's descriptors at all scales at once
      (`superglobal.scale_gem`): True its p = infinity form (max of the L2-normalised
      scales), False the power form with `extract.sgem_p`; None: not scale-GeM.
  """
  exponent: Callable[[Any, Optional[str]], Optional[float]]
  fuses_maps: bool = False
  scale_gem: Optional[bool] = None


COMBINES: registry.Registry[Combine] = registry.Registry("extract.multiscale_combine")
COMBINES.register("gem", Combine(reference_p))
COMBINES.register("mean", Combine(lambda variables, pooling: None))
COMBINES.register("early_fusion", Combine(lambda variables, pooling: None, fuses_maps=True))
COMBINES.register("sgem", Combine(lambda variables, pooling: None, scale_gem=True))
COMBINES.register("sgem_power", Combine(lambda variables, pooling: None, scale_gem=False))


def scale_gem_of(combine: str, sgem_p: Optional[float]) -> Optional[Tuple[bool, float]]:
  """(infinity, p) of `extract_descriptors(scale_gem=)` for a scale-GeM `combine`, else
  None."""
  infinity = COMBINES.get(combine).scale_gem
  if infinity is None:
    return None
  if sgem_p is None:
    raise ValueError(f"extract.multiscale_combine={combine!r} needs extract.sgem_p")
  return (bool(infinity), float(sgem_p))


def multiscale_p_from(variables, combine: str = "gem",
                      pooling: Optional[str] = None) -> Optional[float]:
  """The exponent that combines per-scale descriptors under `combine`, or None (mean, or
  no per-scale descriptors to combine)."""
  if combine not in COMBINES:
    raise ValueError(f"extract.multiscale_combine must be one of {COMBINES.names()}, "
                     f"got {combine!r}")
  return COMBINES.get(combine).exponent(variables, pooling)


def power_term(v, p: float, xp=np):
  """One scale's summand: `max(v, 0)^p` (v itself for p = 1)."""
  return v if p == 1 else xp.power(xp.maximum(v, 0), p)


def finish(acc, num_scales: int, p: float, xp=np, eps: float = 0.0, normalize: bool = True):
  """The combined descriptor of a sum of `power_term`s: `L2((acc / S)^(1/p))`.

  Rows of zeros stay zero (numpy: divided by 1; jax: by max(norm, eps)).
  """
  v = acc / num_scales
  if p != 1:
    v = xp.power(xp.maximum(v, 0), 1.0 / p)
  if not normalize:
    return v
  norm = xp.linalg.norm(v, axis=-1, keepdims=True)
  if xp is np:
    return v / np.where(norm > 0, norm, 1.0)
  return v / xp.maximum(norm, eps)
