"""DELF / DELG local heads: attention, autoencoder, attention pooling, and their losses.

Transcribed from the reference (tensorflow/models `research/delf/delf/python/training/model/
delf_model.py`, `train.py`):

* attention: 1x1 conv (512) -> BatchNorm (`bn_conv1`, Keras' momentum 0.99 and epsilon
  1e-3; batch statistics over the valid positions in training) -> ReLU -> 1x1 conv (1) ->
  softplus, one score per position (`batch_norm=False`: the head without BatchNorm that
  checkpoints written before it have, `config.model.local_attention_bn=False`);
* attention pooling: `mean_{valid positions}(softplus score * l2n(features))` -> [B, C]
  (the code's `reduce_mean`; the DELF paper writes a sum, a constant factor for a fixed
  input size that the classifier absorbs), then a classifier on landmark labels (plain
  softmax as the reference's `att_fc`, or ArcFace / CosFace through `losses.MarginHead`);
* DELG autoencoder: 1x1 conv to `reduced_dim` (128) = the local descriptor, 1x1 conv back
  to C channels + ReLU; with it, attention scores come from the reconstruction and pooling
  uses the original features, as `Delf.global_and_local_forward_pass` does;
* losses: `attention_loss_weight * CE(attention logits) + reconstruction_loss_weight *
  mean((stage - reconstruction)^2)` with the reference's defaults 1 and 10 (train.py flags
  `attention_loss_weight`, `reconstruction_loss_weight`); the stage features enter the head
  under `stop_gradient`, so local losses never reach the backbone (DELG, Sec. 3.2).
"""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from retrieval_jax import losses as losses_lib

# The reference's loss weights (train.py flags).
ATTENTION_LOSS_WEIGHT = 1.0
RECONSTRUCTION_LOSS_WEIGHT = 10.0
ATTENTION_CLASSIFIERS = ("softmax", "arcface", "cosface")


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """`tf.nn.l2_normalize` along the last axis: x / sqrt(max(sum x^2, eps))."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps))


def attention_pool(features: jnp.ndarray, prob: jnp.ndarray,
                   mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Attention-weighted mean of L2-normalised features over the valid positions.

  Args:
    features: [B, h, w, C].
    prob: [B, h, w] non-negative attention.
    mask: optional [B, h, w] bool, True on valid positions.
  Returns:
    [B, C].
  """
  weighted = l2_normalize(features) * prob[..., None]
  if mask is None:
    return jnp.mean(weighted, axis=(1, 2))
  m = mask.astype(weighted.dtype)
  total = jnp.sum(weighted * m[..., None], axis=(1, 2))
  return total / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)[:, None]


# Keras BatchNormalization defaults (the reference's `bn_conv1`).
KERAS_BN_MOMENTUM = 0.99
KERAS_BN_EPSILON = 1e-3


class AttentionHead(nn.Module):
  """1x1 conv -> BatchNorm -> ReLU -> 1x1 conv -> softplus: [B, h, w, C] -> (prob, score)."""
  hidden: int = 512
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, mask: Optional[jnp.ndarray] = None, train: bool = False):
    y = nn.Conv(self.hidden, (1, 1), name="conv1")(x)
    if self.batch_norm:
      y = nn.BatchNorm(use_running_average=not train, momentum=KERAS_BN_MOMENTUM,
                       epsilon=KERAS_BN_EPSILON, name="bn_conv1")(
                           y, mask=None if mask is None else mask[..., None])
    y = nn.relu(y)
    score = nn.Conv(1, (1, 1), name="conv2")(y)[..., 0]
    return jax.nn.softplus(score), score


class Autoencoder(nn.Module):
  """DELG's dimension reduction: [B, h, w, C] -> (reduced [.., d], reconstruction [.., C])."""
  reduced_dim: int = 128

  @nn.compact
  def __call__(self, x):
    reduced = nn.Conv(self.reduced_dim, (1, 1), name="conv1")(x)
    expanded = nn.relu(nn.Conv(x.shape[-1], (1, 1), name="conv2")(reduced))
    return reduced, expanded


class LocalHead(nn.Module):
  """The DELF (reduced_dim=0) or DELG (reduced_dim>0) local head on one trunk stage.

  Attributes:
    num_classes: classes of the attention classifier (0: no classifier, extraction only).
    reduced_dim: autoencoder output size (DELG 128); 0 for none (DELF: descriptors are the
      stage features, reduced later by PCA if wanted).
    attention_hidden: channels of the attention's first conv (512 in the reference).
    attention_bn: the reference's BatchNorm between the attention's convolutions.
    classifier: "softmax" (the reference), "arcface" or "cosface".
    classifier_scale, classifier_margin: for the margin classifiers.
  """
  num_classes: int = 0
  reduced_dim: int = 128
  attention_hidden: int = 512
  attention_bn: bool = True
  classifier: str = "softmax"
  classifier_scale: float = 30.0
  classifier_margin: Optional[float] = None

  @nn.compact
  def __call__(self, stage: jnp.ndarray, mask: Optional[jnp.ndarray] = None,
               labels: Optional[jnp.ndarray] = None, train: bool = False
               ) -> Dict[str, Any]:
    """Runs the head.

    Args:
      stage: [B, h, w, C] trunk stage (stop_gradient is applied here).
      mask: optional [B, h, w] bool validity of positions.
      labels: [B] int, for a margin classifier's training logits.
      train: the attention BatchNorm uses (and updates) batch statistics.
    Returns:
      {"attention": [B, h, w] (0 on padding), "local_descriptors": [B, h, w, d] (not
       normalised), "local_mask": mask, and when num_classes > 0 "attention_logits"
       [B, num_classes]; with the autoencoder "reconstruction" [B, h, w, C]}.
    """
    stage = jax.lax.stop_gradient(stage.astype(jnp.float32))
    out: Dict[str, Any] = {"local_mask": mask}
    attention_input, descriptors = stage, stage
    if self.reduced_dim:
      descriptors, attention_input = Autoencoder(self.reduced_dim, name="autoencoder")(stage)
      out["reconstruction"] = attention_input
    prob, _ = AttentionHead(self.attention_hidden, self.attention_bn, name="attention")(
        attention_input, mask, train)
    if mask is not None:
      prob = prob * mask.astype(prob.dtype)
    out["attention"] = prob
    out["local_descriptors"] = descriptors
    if self.num_classes:
      pooled = attention_pool(stage, prob, mask)
      if self.classifier == "softmax":
        logits = nn.Dense(self.num_classes, name="attention_classifier")(pooled)
      elif self.classifier in ("arcface", "cosface"):
        logits = losses_lib.MarginHead(self.num_classes, scale=self.classifier_scale,
                                       margin=self.classifier_margin, kind=self.classifier,
                                       name="attention_classifier")(pooled, labels)
      else:
        raise ValueError(f"LocalHead.classifier must be one of {ATTENTION_CLASSIFIERS}, "
                         f"got {self.classifier!r}")
      out["attention_logits"] = logits
    return out


def reconstruction_loss(stage: jnp.ndarray, reconstruction: jnp.ndarray,
                        mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """The reference's `reduce_mean(MSE(block3, expanded))`, over valid positions only.

  Args:
    stage: [B, h, w, C] (gradient stopped here).
    reconstruction: [B, h, w, C].
    mask: optional [B, h, w] bool.
  Returns:
    Scalar: mean over valid positions of the per-position mean squared error over channels.
  """
  err = jnp.mean(jnp.square(jax.lax.stop_gradient(stage.astype(jnp.float32))
                            - reconstruction), axis=-1)
  if mask is None:
    return jnp.mean(err)
  m = mask.astype(err.dtype)
  return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)


def local_loss(head_out: Dict[str, Any], stage: jnp.ndarray, labels: jnp.ndarray, *,
               attention_weight: float = ATTENTION_LOSS_WEIGHT,
               reconstruction_weight: float = RECONSTRUCTION_LOSS_WEIGHT
               ) -> Dict[str, jnp.ndarray]:
  """The DELF/DELG local loss terms and their weighted sum.

  Args:
    head_out: `LocalHead` output (with "attention_logits").
    stage: [B, h, w, C] the stage the head saw (reconstruction target).
    labels: [B] int class ids (< 0: unlabelled, left out of the attention loss).
    attention_weight, reconstruction_weight: the reference's 1 and 10 by default.
  Returns:
    {"attention_loss", "reconstruction_loss" (0 without autoencoder), "local_loss"}.
  """
  if "attention_logits" not in head_out:
    raise ValueError("local_loss needs LocalHead(num_classes > 0): no attention classifier")
  # Unlabelled images (label -1, e.g. SfM-120k outside any cluster) do not count.
  valid = (labels >= 0).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      head_out["attention_logits"].astype(jnp.float32), jnp.maximum(labels, 0))
  attn = jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  recon = jnp.zeros((), jnp.float32)
  if "reconstruction" in head_out:
    recon = reconstruction_loss(stage, head_out["reconstruction"], head_out["local_mask"])
  return {"attention_loss": attn, "reconstruction_loss": recon,
          "local_loss": attention_weight * attn + reconstruction_weight * recon}
