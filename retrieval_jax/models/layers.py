"""Building blocks shared by the backbones: torch-compatible padding, masks, BatchNorm.

Backbone contract (every module in `retrieval_jax/models/` that is a trunk):

    class Trunk(nn.Module):
        dtype: Any = jnp.float32          # compute dtype; params stay float32
        bn_mode: str = "frozen_stats"     # see BN_MODES
        def __call__(self, x, mask=None, train=False) -> dict:
            # x: [B, H, W, 3] float, already normalised for these weights.
            # mask: optional [B, H, W] bool, True on valid (unpadded) pixels; the padding is
            #   at the bottom/right. It is re-applied after every normalisation so that a padded
            #   image gives exactly the feature map of the unpadded one.
            # returns {"feature_map": [B, h, w, C], "mask": [B, h, w] bool or None,
            #          "stages": tuple of the last stages' outputs (for multi-layer descriptors),
            #          "stage_masks": matching masks}

Weight layouts: PyTorch convolution kernels are [out, in, kh, kw], Flax's [kh, kw, in, out].
"""
import functools
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# "train": batch statistics when training, all BN params trainable.
# "frozen_stats": running statistics always (the cnnimageretrieval-pytorch default), scale and
#   shift still trained.
# "frozen": running statistics and scale/shift excluded from training (optim.py masks them).
BN_MODES = ("train", "frozen_stats", "frozen")

# torchvision's BatchNorm epsilon; Keras uses 1e-3.
TORCH_BN_EPS = 1e-5


def torch_padding(kernel: int, stride: int = 1, dilation: int = 1) -> Tuple[Tuple[int, int], ...]:
  """Symmetric padding of PyTorch's `padding=(k-1)//2`, which JAX's "SAME" does not equal."""
  del stride
  p = dilation * (kernel - 1) // 2
  return ((p, p), (p, p))


def downsample_mask(mask: Optional[jnp.ndarray], stride: int, mode: str = "ceil"):
  """Validity mask after a stride-`stride` layer.

  With top-left aligned content and symmetric `(k-1)//2` padding, an output position is valid
  when its window starts inside the valid region: ceil(valid / stride) positions, which strided
  slicing gives directly. Unpadded max-pools (VGG's 2x2/2) keep floor(valid / stride): `mode="floor"`.

  Args:
    mask: [B, H, W] bool or None.
    stride: the layer's stride.
    mode: "ceil" or "floor".
  Returns:
    [B, ceil(H/stride), ceil(W/stride)] bool (or floor for "floor"), or None.
  """
  if mask is None or stride == 1:
    return mask
  if mode == "ceil":
    return mask[:, ::stride, ::stride]
  if mode == "floor":
    h, w = mask.shape[1] // stride, mask.shape[2] // stride
    # An output is valid only if its whole window is valid: the window's last pixel is.
    return mask[:, stride - 1::stride, stride - 1::stride][:, :h, :w]
  raise ValueError(f"downsample_mask: unknown mode {mode!r}")


def apply_mask(x: jnp.ndarray, mask: Optional[jnp.ndarray]) -> jnp.ndarray:
  """Zeroes padded positions of `x` [B, h, w, C] (mask [B, h, w]); identity for mask=None."""
  if mask is None:
    return x
  return x * mask[..., None].astype(x.dtype)


def batch_norm(bn_mode: str, train: bool, dtype: Any, name: str, eps: float = TORCH_BN_EPS,
               scale_init=nn.initializers.ones):
  """A BatchNorm configured from `bn_mode` (see BN_MODES) and the call's `train` flag."""
  if bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
  use_running_average = (not train) or bn_mode != "train"
  return nn.BatchNorm(use_running_average=use_running_average, momentum=0.9, epsilon=eps,
                      dtype=dtype, param_dtype=jnp.float32, name=name, scale_init=scale_init)


@functools.partial(jax.jit, static_argnames="stride")
def _depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """Grouped convolution, one group per channel (XLA's convolution; GPU/TPU)."""
  k = kernel.shape[0]
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), torch_padding(k),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1])


@functools.partial(jax.jit, static_argnames="stride")
def _depthwise_taps(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """The same convolution as k*k shifted multiply-adds (float32 accumulation).

  XLA's CPU backend runs grouped convolutions ~6-8x slower than this elementwise form,
  which it fuses into one loop (MobileNetV2 at 1024 px: 0.76 -> 3.3 images per CPU-second,
  BENCHMARKS.md); the result equals the convolution up to float rounding. jit'd (as
  `_depthwise_conv`) so that an un-jitted model.apply compiles one program per shape, not
  one per tap.
  """
  k = kernel.shape[0]
  p = (k - 1) // 2
  b, h, w, c = x.shape
  oh, ow = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))).astype(acc_dtype)
  kernel = kernel.astype(acc_dtype)
  out = None
  for i in range(k):
    for j in range(k):
      tap = jax.lax.slice(xp, (0, i, j, 0),
                          (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                          (1, stride, stride, 1)) * kernel[i, j, 0]
      out = tap if out is None else out + tap
  return out.astype(x.dtype)


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution (torch padding, no bias): params as nn.Conv's `kernel`
  [k, k, 1, C], so converters and checkpoints see no difference.

  On CPU it lowers to shifted multiply-adds (`_depthwise_taps`), elsewhere to XLA's grouped
  convolution; `jax.lax.platform_dependent` picks per backend, so exported programs keep both.
  """
  kernel: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel, self.kernel, 1, c), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    return jax.lax.platform_dependent(
        x, kernel, cpu=functools.partial(_depthwise_taps, stride=self.stride),
        default=functools.partial(_depthwise_conv, stride=self.stride))


class ConvBN(nn.Module):
  """Conv (torch padding, no bias) + BatchNorm (+ optional activation), then the mask.

  Param names mirror what converters expect: `conv/kernel`, `bn/{scale,bias}`,
  batch_stats `bn/{mean,var}`.
  """
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  activation: Optional[str] = "relu"  # "relu", "relu6" or None
  bn_mode: str = "frozen_stats"
  dtype: Any = jnp.float32
  bn_eps: float = TORCH_BN_EPS
  relu_floor: float = 0.0  # "relu" clamps below at this value (SuperGlobal's ReLU+)

  @nn.compact
  def __call__(self, x, mask=None, train=False):
    if self.groups > 1 and self.groups == x.shape[-1] == self.features:
      x = DepthwiseConv(self.kernel, self.stride, dtype=self.dtype, name="conv")(x)
    else:
      x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                  padding=torch_padding(self.kernel), feature_group_count=self.groups,
                  use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    x = batch_norm(self.bn_mode, train, self.dtype, "bn", self.bn_eps)(x)
    if self.activation == "relu":
      x = jnp.maximum(x, jnp.asarray(self.relu_floor, x.dtype)) if self.relu_floor else nn.relu(x)
    elif self.activation == "relu6":
      x = jnp.clip(x, 0.0, 6.0)
    elif self.activation is not None:
      raise ValueError(f"ConvBN: unknown activation {self.activation!r}")
    mask = downsample_mask(mask, self.stride)
    return apply_mask(x, mask), mask


# ----------------------------------------------------------------------------------------------
# Torch -> Flax weight layout helpers (numpy in, numpy out).


def torch_conv_kernel(w: np.ndarray) -> np.ndarray:
  """[out, in/groups, kh, kw] -> [kh, kw, in/groups, out] (depthwise: [C,1,k,k] -> [k,k,1,C])."""
  return np.transpose(np.asarray(w), (2, 3, 1, 0))


def torch_bn(state_dict, prefix: str):
  """BatchNorm tensors under `prefix` -> (params, batch_stats) dicts in Flax naming."""
  params = {"scale": np.asarray(state_dict[prefix + ".weight"]),
            "bias": np.asarray(state_dict[prefix + ".bias"])}
  stats = {"mean": np.asarray(state_dict[prefix + ".running_mean"]),
           "var": np.asarray(state_dict[prefix + ".running_var"])}
  return params, stats


def convbn_from_torch(state_dict, conv_prefix: str, bn_prefix: str):
  """A `ConvBN`'s (params, batch_stats) from torch conv and BatchNorm prefixes."""
  bn_params, bn_stats = torch_bn(state_dict, bn_prefix)
  params = {"conv": {"kernel": torch_conv_kernel(state_dict[conv_prefix + ".weight"])},
            "bn": bn_params}
  return params, {"bn": bn_stats}


def check_all_used(state_dict, used: Sequence[str], ignore_prefixes: Sequence[str] = ()):
  """Raises if a weight file holds tensors the converter did not consume (a wrong architecture)."""
  left = [k for k in state_dict if k not in set(used)
          and not k.endswith("num_batches_tracked")
          and not any(k.startswith(p) for p in ignore_prefixes)]
  if left:
    raise ValueError(f"weights not used by the converter ({len(left)}): {left[:8]} ... "
                     "Is the file for a different architecture?")


def require_keys(state_dict: Mapping[str, Any], keys: Iterable[str], arch: str) -> None:
  """Raises a ValueError naming every tensor `arch` needs that `state_dict` lacks.

  Shared by the converters: together with `check_all_used` it turns a file for another
  architecture into one clear error.
  """
  missing = [k for k in keys if k not in state_dict]
  if missing:
    present = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    raise ValueError(f"weights missing for {arch} ({len(missing)} tensors): {missing[:8]} ... "
                     f"The file has {len(present)} tensors, e.g. {present[:4]}. "
                     "Is it for a different architecture or prefixed (e.g. 'module.')?")


def convert_convbn_pairs(state_dict: Mapping[str, Any],
                         pairs: Sequence[Tuple[Tuple[str, ...], str, str]],
                         arch: str, ignore_prefixes: Sequence[str] = ()) -> Dict[str, Dict]:
  """Converts torch (conv, BatchNorm) pairs into a `ConvBN`-style variable tree.

  Args:
    state_dict: torch tensors or numpy arrays by torch key.
    pairs: (flax module path, torch conv prefix, torch BN prefix) for every ConvBN.
    arch: name used in error messages.
    ignore_prefixes: torch keys to leave out silently (e.g. the classifier).
  Returns:
    {"params": ..., "batch_stats": ...} nested dicts of numpy arrays.
  Raises:
    ValueError: tensors missing from, or left unused in, `state_dict`.
  """
  needed = []
  for _, conv, bn in pairs:
    needed.append(conv + ".weight")
    needed += [f"{bn}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
  require_keys(state_dict, needed, arch)
  params, stats = {}, {}
  for path, conv, bn in pairs:
    p, s = convbn_from_torch(state_dict, conv, bn)
    _set(params, path, p)
    _set(stats, path, s)
  check_all_used(state_dict, needed, ignore_prefixes)
  return {"params": params, "batch_stats": stats}


def _set(tree: Dict, path: Sequence[str], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value
