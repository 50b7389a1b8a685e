"""ViT trunks in DINOv2's layout (ViT-S/B/L, patch 14, layer scale, no registers), and the
converter of timm / DINOv2 state dicts.

The arithmetic is timm's `VisionTransformer` with `dynamic_img_size=True` (the form timm's
`vit_*_patch14_dinov2` models take): a 14x14/14 patch convolution (the bottom/right pixels
that do not fill a patch are dropped), the class token, the learned positional embedding
resampled from its stored grid to the image's patch grid (torch's `F.interpolate(mode=
"bicubic", antialias=True)`, i.e. the Keys kernel with a = -0.5, normalised at the borders,
widened when shrinking, which is what `jax.image.scale_and_translate(method="cubic",
antialias=True)` computes), pre-norm blocks (LayerNorm eps 1e-6, multi-head attention with a
qkv bias, layer scale, exact-GELU MLP x4, layer scale) and a final LayerNorm.

Padded batches: an image padded at the bottom/right gives the unpadded image's tokens. Its
valid patches are floor(valid / 14) per axis; the positional embedding is resampled to that
grid for each image (a traced scale), and attention ignores the padded patches' keys.

Outputs (the backbone contract of `layers.py`, plus the class token):
  {"feature_map": patch tokens [B, h, w, D] after the final norm, "mask": [B, h, w],
   "cls": [B, D] the normalised class token, "stages"/"stage_masks": (map, map)}.

Param tree (timm's names, so conversion is a table lookup): patch_embed/{kernel, bias},
cls_token, pos_embed, blocks_{i}/{norm1, attn/qkv, attn/proj, ls1/gamma, norm2, mlp/fc1,
mlp/fc2, ls2/gamma}, norm.
"""
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PATCH = 14
DINOV2_POS_GRID = 37  # DINOv2 / timm `*_dinov2` weights: 518 px / 14
LN_EPS = 1e-6

# name -> (embed_dim, depth, num_heads), timm's vit_{small,base,large}_patch14_dinov2.
VIT_SIZES = {"vit_s14": (384, 12, 6), "vit_b14": (768, 12, 12), "vit_l14": (1024, 24, 16)}


def resample_pos_embed(grid_embed: jnp.ndarray, height: int, width: int,
                       scale: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """The positional grid [G, G', D] at [height, width] as timm resamples it.

  Args:
    grid_embed: [G, G', D] stored grid (class token excluded).
    height, width: output grid (static).
    scale: optional traced (sy, sx): resample to a grid of `(sy * G, sx * G')` instead,
      written into the top-left of [height, width] (the rest is extrapolated, and masked).
  """
  g_h, g_w, _ = grid_embed.shape
  x = grid_embed.astype(jnp.float32)
  if scale is None:
    if (g_h, g_w) == (height, width):
      return x
    scale = jnp.asarray([height / g_h, width / g_w], jnp.float32)
  return jax.image.scale_and_translate(x, (height, width, x.shape[-1]), (0, 1), scale,
                                       jnp.zeros((2,), jnp.float32), method="cubic",
                                       antialias=True)


class Attention(nn.Module):
  """timm's Attention (qkv bias, no qk norm); padded keys masked out."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_valid: Optional[jnp.ndarray]) -> jnp.ndarray:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, head_dim]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * head_dim ** -0.5, k).astype(jnp.float32)
    if key_valid is not None:
      logits = jnp.where(key_valid[:, None, None, :], logits, -jnp.inf)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return nn.Dense(d, dtype=self.dtype, name="proj")(out)


class LayerScale(nn.Module):
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    y = jax.nn.gelu(y, approximate=False)  # torch nn.GELU()
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=jnp.float32, name=name)


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  init_value: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_valid):
    y = _layer_norm("norm1")(x).astype(self.dtype)
    x = x + LayerScale(self.init_value, name="ls1")(
        Attention(self.num_heads, self.dtype, name="attn")(y, key_valid))
    y = _layer_norm("norm2")(x).astype(self.dtype)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + LayerScale(self.init_value, name="ls2")(Mlp(hidden, self.dtype, name="mlp")(y))


class ViT(nn.Module):
  """DINOv2-layout ViT trunk (see the module docstring).

  Attributes:
    embed_dim, depth, num_heads: the size (VIT_SIZES; small values give tiny test models).
    pos_grid: side of the stored positional grid (37 for DINOv2 weights, img_size / 14).
    mlp_ratio, init_value: MLP width and layer-scale init.
    dtype: compute dtype; params, LayerNorm and softmax stay float32.
    bn_mode: accepted for the config's default `backbone_kwargs`; a ViT has no BatchNorm.
  """
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  pos_grid: int = DINOV2_POS_GRID
  mlp_ratio: float = 4.0
  init_value: float = 1e-5
  dtype: Any = jnp.float32
  bn_mode: str = "frozen_stats"

  @property
  def out_features(self) -> int:
    return self.embed_dim

  @nn.compact
  def __call__(self, x, mask=None, train=False) -> Dict[str, Any]:
    del train  # no BatchNorm, no dropout
    b, height, width, _ = x.shape
    gh, gw = height // PATCH, width // PATCH
    if gh == 0 or gw == 0:
      raise ValueError(f"a ViT/14 needs images of at least {PATCH} px, got {height}x{width}")
    x = x[:, :gh * PATCH, :gw * PATCH].astype(self.dtype)
    tokens = nn.Conv(self.embed_dim, (PATCH, PATCH), (PATCH, PATCH), padding="VALID",
                     dtype=self.dtype, name="patch_embed")(x)  # [B, gh, gw, D]
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, 1 + self.pos_grid ** 2, self.embed_dim), jnp.float32)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.embed_dim),
                     jnp.float32)
    grid = pos[0, 1:].reshape(self.pos_grid, self.pos_grid, self.embed_dim)
    patch_mask = None
    if mask is None:
      pos_patches = resample_pos_embed(grid, gh, gw)[None]
    else:
      # Valid patches: those the unpadded image has (floor(valid / 14) per axis).
      valid_h = jnp.sum(mask[:, :, 0], axis=1) // PATCH
      valid_w = jnp.sum(mask[:, 0, :], axis=1) // PATCH
      patch_mask = ((jnp.arange(gh)[None, :, None] < valid_h[:, None, None])
                    & (jnp.arange(gw)[None, None, :] < valid_w[:, None, None]))
      scales = jnp.stack([valid_h, valid_w], -1).astype(jnp.float32) / self.pos_grid
      pos_patches = jax.vmap(lambda s: resample_pos_embed(grid, gh, gw, s))(scales)
    tokens = tokens.astype(jnp.float32) + pos_patches
    cls_token = jnp.broadcast_to(cls + pos[:, :1], (b, 1, self.embed_dim))
    h = jnp.concatenate([cls_token, tokens.reshape(b, gh * gw, self.embed_dim)], axis=1)
    key_valid = None
    if patch_mask is not None:
      key_valid = jnp.concatenate([jnp.ones((b, 1), bool), patch_mask.reshape(b, -1)], 1)
    h = h.astype(self.dtype)
    for i in range(self.depth):
      h = Block(self.num_heads, self.mlp_ratio, self.init_value, self.dtype,
                name=f"blocks_{i}")(h, key_valid)
    h = _layer_norm("norm")(h)  # float32
    fmap = h[:, 1:].reshape(b, gh, gw, self.embed_dim)
    if patch_mask is not None:
      fmap = fmap * patch_mask[..., None].astype(fmap.dtype)
    return {"feature_map": fmap, "mask": patch_mask, "cls": h[:, 0],
            "stages": (fmap, fmap), "stage_masks": (patch_mask, patch_mask)}


def make_vit(name: str):
  """`(**kwargs) -> ViT` of the registered size `name` (kwargs override the size)."""
  dim, depth, heads = VIT_SIZES[name]

  def make(**kwargs):
    return ViT(**dict(dict(embed_dim=dim, depth=depth, num_heads=heads), **kwargs))
  return make


# ----------------------------------------------------------------------------------------------
# Weight conversion.

_IGNORED = ("mask_token", "head.", "fc_norm.")  # DINOv2's masked-token, classifier heads


def convert_timm_vit(state_dict: Mapping[str, Any]) -> Dict[str, Dict]:
  """A timm `vit_*_patch14_dinov2` or DINOv2 (facebookresearch) state dict -> `ViT` variables.

  Both use the same names (DINOv2's chunked `blocks.C.I.` is flattened); the positional
  grid stays at its stored size (set `backbone_kwargs.pos_grid` to its side).

  Raises:
    ValueError: register tokens, or tensors this layout does not have.
  """
  sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        if re.match(r"^blocks\.\d+\.\d+\.", k) else k: np.asarray(v, np.float32)
        for k, v in state_dict.items()}
  if "reg_token" in sd or "register_tokens" in sd:
    raise ValueError("this ViT has register tokens; the vit_*14 trunks are register-free "
                     "(use the plain DINOv2 weights, not *_reg4)")
  params: Dict[str, Any] = {}
  used = set()

  def take(key):
    if key not in sd:
      raise ValueError(f"ViT state dict lacks {key!r}")
    used.add(key)
    return sd[key]

  w = take("patch_embed.proj.weight")  # [D, 3, 14, 14]
  params["patch_embed"] = {"kernel": w.transpose(2, 3, 1, 0),
                           "bias": take("patch_embed.proj.bias")}
  params["cls_token"] = take("cls_token").reshape(1, 1, -1)
  params["pos_embed"] = take("pos_embed")
  depth = 1 + max(int(m.group(1)) for m in map(re.compile(r"^blocks\.(\d+)\.").match, sd) if m)

  def dense(prefix):
    return {"kernel": take(f"{prefix}.weight").T, "bias": take(f"{prefix}.bias")}

  def norm(prefix):
    return {"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}

  for i in range(depth):
    t = f"blocks.{i}"
    params[f"blocks_{i}"] = {
        "norm1": norm(f"{t}.norm1"), "norm2": norm(f"{t}.norm2"),
        "attn": {"qkv": dense(f"{t}.attn.qkv"), "proj": dense(f"{t}.attn.proj")},
        "ls1": {"gamma": take(f"{t}.ls1.gamma")}, "ls2": {"gamma": take(f"{t}.ls2.gamma")},
        "mlp": {"fc1": dense(f"{t}.mlp.fc1"), "fc2": dense(f"{t}.mlp.fc2")}}
  params["norm"] = norm("norm")
  left = [k for k in sd if k not in used and not k.startswith(_IGNORED)]
  if left:
    raise ValueError(f"ViT state dict holds tensors this layout does not have: {left[:8]}")
  return {"params": params}


def pos_grid_of(state_dict: Mapping[str, Any]) -> Tuple[int, int]:
  """(side of the stored positional grid, embed dim) of a ViT state dict."""
  n, dim = np.shape(state_dict["pos_embed"])[-2:]
  side = int(round((n - 1) ** 0.5))
  if side * side != n - 1:
    raise ValueError(f"pos_embed of {n} tokens is not a class token plus a square grid")
  return side, int(dim)
