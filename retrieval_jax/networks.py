"""The network of a config: a RetrievalNet, or a DelgNet when `config.model.local_head` says so.

Training, restoring and extraction build their model here, so a DELG experiment is one
config switch (`model.local_head="delg"`): DelgNet is a RetrievalNet (same parameter names,
output keys and `trunk` / `head`) plus the local head (retrieval_jax/local/). Its attention classifier has `model.local_num_classes` outputs, a
config value, so the parameter shapes never depend on the data that happens to be loaded.
"""
from retrieval_jax.local import model as local_model
from retrieval_jax.models import backbones
from retrieval_jax.models import retrieval_net

LOCAL_HEADS = ("", "delg")


def build_network(model_config):
  """The flax module of `config.model` (fields and defaults: configs/common.py)."""
  kind = model_config.local_head
  if kind not in LOCAL_HEADS:
    raise ValueError(f"model.local_head must be one of {LOCAL_HEADS}, got {kind!r}")
  if not kind:
    return retrieval_net.build_retrieval_net(model_config)
  spec = backbones.get_backbone(model_config.backbone)
  backbone_kwargs = dict(model_config.backbone_kwargs or {})
  if model_config.local_block3_strides:
    if not model_config.backbone.startswith("resnet"):
      raise ValueError(f"model.local_block3_strides (DELG's ResNet layout) needs a ResNet "
                       f"trunk, not {model_config.backbone!r}: leave it False (the local "
                       f"stage is subsampled by model.local_subsample)")
    backbone_kwargs["block3_strides"] = True
  return local_model.DelgNet(
      backbone=model_config.backbone,
      backbone_kwargs=backbone_kwargs,
      pooling=model_config.pooling, pooling_kwargs=dict(model_config.pooling_kwargs or {}),
      whitening_dim=int(model_config.whitening_dim),
      multi_layer=bool(model_config.multi_layer),
      num_classes=int(model_config.local_num_classes),
      reduced_dim=int(model_config.local_dim),
      attention_hidden=int(model_config.local_attention_hidden),
      attention_bn=bool(model_config.local_attention_bn),
      local_subsample=int(model_config.local_subsample),
      classifier=model_config.local_classifier,
      mean=tuple(spec.mean), std=tuple(spec.std), dtype=model_config.dtype,
      **retrieval_net.superglobal_fields(model_config))  # ReLU+ / regional GeM: global head


def has_local_head(model) -> bool:
  return isinstance(model, local_model.DelgNet)


def check_classes(model_config, num_labels: int) -> None:
  """The attention classifier must cover the training label ids (max label + 1)."""
  if model_config.local_head and int(model_config.local_num_classes) < max(num_labels, 2):
    raise ValueError(f"model.local_head={model_config.local_head!r} trains an attention "
                     f"classifier on the training labels 0..{num_labels - 1}: set "
                     f"--config.model.local_num_classes={num_labels} (it is "
                     f"{model_config.local_num_classes})")
