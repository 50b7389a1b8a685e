"""ViT trunks (models/vit.py) against timm's own `vit_*_patch14_dinov2` (random init,
`dynamic_img_size=True`), weight import by file, CLS / GeM / CLS+GeM poolings, padded batches."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from retrieval_jax import networks
from retrieval_jax.models import backbones
from retrieval_jax.models import pooling_ops
from retrieval_jax.models import pretrained
from retrieval_jax.models import retrieval_net
from retrieval_jax.models import vit
from retrieval_jax.models import weight_files

sys.path.insert(0, os.path.dirname(__file__))
import torchvision_cpu  # pylint: disable=wrong-import-position
from test_train import demo_root  # pylint: disable=wrong-import-position,unused-import

TOL = 1e-4
TIMM_NAMES = {"vit_s14": "vit_small_patch14_dinov2", "vit_b14": "vit_base_patch14_dinov2",
              "vit_l14": "vit_large_patch14_dinov2"}


def timm_vit(name, img_size, seed=0):
  """timm's model, random init with non-trivial layer scales / class token."""
  timm = torchvision_cpu.timm()
  torch.manual_seed(seed)
  model = timm.create_model(TIMM_NAMES[name], pretrained=False, img_size=img_size,
                            dynamic_img_size=True, num_classes=0).eval()
  with torch.no_grad():
    for k, v in model.state_dict().items():
      if k.endswith(("gamma", "cls_token", "pos_embed")) or "norm" in k:
        v.copy_(torch.randn_like(v) * 0.5 + (1.0 if "norm" in k and "weight" in k else 0.0))
  return model


def timm_tokens(model, images):
  """(class token [B, D], patch tokens [B, h, w, D]) after the final norm, from NHWC."""
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    tokens = model.forward_features(x)
  b, _, height, width = x.shape
  h, w = height // 14, width // 14
  return tokens[:, 0].numpy(), tokens[:, 1:].reshape(b, h, w, -1).numpy()


def flax_trunk(name, state_dict, pos_grid):
  variables = backbones.get_backbone(name).convert(
      {k: v.numpy() for k, v in state_dict.items()})
  return backbones.get_backbone(name).make(pos_grid=pos_grid), variables


@pytest.mark.parametrize("size", [(56, 56), (84, 98)])
def test_vit_s14_equals_timm_on_two_image_sizes(size):
  """Stored grid 4x4 (img_size 56): 56 px uses it as is, 84x98 px resamples it to 6x7."""
  model = timm_vit("vit_s14", 56)
  trunk, variables = flax_trunk("vit_s14", model.state_dict(), 4)
  images = np.random.default_rng(1).normal(0, 1, (2, *size, 3)).astype(np.float32)
  out = jax.jit(trunk.apply)(variables, jnp.asarray(images))
  cls, patches = timm_tokens(model, images)
  np.testing.assert_allclose(np.asarray(out["cls"]), cls, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(np.asarray(out["feature_map"]), patches, rtol=TOL, atol=TOL)


def test_pos_embed_resampling_equals_timm_when_shrinking_too():
  timm = torchvision_cpu.timm()
  grid = np.random.default_rng(2).normal(0, 1, (1, 1 + 37 * 37, 8)).astype(np.float32)
  from timm.layers import pos_embed as timm_pos  # pylint: disable=import-outside-toplevel
  del timm
  for new in ((4, 6), (50, 41)):
    want = timm_pos.resample_abs_pos_embed(torch.from_numpy(grid), new_size=list(new),
                                           old_size=[37, 37], num_prefix_tokens=1)
    got = vit.resample_pos_embed(jnp.asarray(grid[0, 1:].reshape(37, 37, 8)), *new)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, 8), want[0, 1:].numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b14", "vit_l14"])
def test_larger_vits_equal_timm(name):
  model = timm_vit(name, 56)
  trunk, variables = flax_trunk(name, model.state_dict(), 4)
  images = np.random.default_rng(3).normal(0, 1, (1, 70, 84, 3)).astype(np.float32)
  out = jax.jit(trunk.apply)(variables, jnp.asarray(images))
  cls, patches = timm_tokens(model, images)
  np.testing.assert_allclose(np.asarray(out["cls"]), cls, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(np.asarray(out["feature_map"]), patches, rtol=TOL, atol=TOL)


def _tiny(pooling, **kw):
  return retrieval_net.RetrievalNet(
      backbone="vit_s14", backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2,
                                           "pos_grid": 4, "init_value": 0.5},
      pooling=pooling, **kw)


@pytest.mark.parametrize("pooling", ["cls", "gem", "cls_gem"])
def test_padded_image_equals_unpadded_for_every_pooling(pooling):
  model = _tiny(pooling)
  rng = np.random.default_rng(4)
  images = rng.integers(0, 255, (2, 98, 84, 3)).astype(np.uint8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(images))
  small = images[:1, :61, :45]  # 4 x 3 patches; the remainder pixels are dropped
  padded = images.copy()
  padded[0] = 0
  padded[0, :61, :45] = small[0]
  mask = np.zeros(images.shape[:3], bool)
  mask[0, :61, :45] = True
  mask[1] = True
  apply = jax.jit(model.apply)
  got = apply(variables, jnp.asarray(padded), jnp.asarray(mask))
  alone = apply(variables, jnp.asarray(small))
  full = apply(variables, jnp.asarray(images[1:]))
  np.testing.assert_allclose(np.asarray(got["descriptor"])[0],
                             np.asarray(alone["descriptor"])[0], atol=1e-5)
  np.testing.assert_allclose(np.asarray(got["descriptor"])[1],
                             np.asarray(full["descriptor"])[0], atol=1e-5)
  dim = {"cls": 32, "gem": 32, "cls_gem": 64}[pooling]
  assert got["descriptor"].shape == (2, dim)


def test_poolings_are_cls_gem_and_their_concatenation():
  images = np.random.default_rng(5).integers(0, 255, (2, 56, 70, 3)).astype(np.uint8)
  both = _tiny("cls_gem", pooling_kwargs={"p_init": 3.0})
  variables = both.init(jax.random.PRNGKey(1), jnp.asarray(images))
  trunk_out = both.apply(variables, jnp.asarray(images), method=retrieval_net.RetrievalNet.trunk)
  fmap = np.asarray(trunk_out[0][0], np.float64)
  gem = np.mean(np.maximum(fmap, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
  cls_model = _tiny("cls")
  cls = np.asarray(cls_model.apply({"params": {"backbone": variables["params"]["backbone"]}},
                                   jnp.asarray(images))["pooled"], np.float64)
  unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
  want = unit(np.concatenate([unit(cls), unit(gem)], axis=1))
  np.testing.assert_allclose(np.asarray(both.apply(variables, jnp.asarray(images))["pooled"]),
                             want, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weight_file_import_by_path(tmp_path, suffix):
  model = timm_vit("vit_s14", 56, seed=6)
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  sd["mask_token"] = torch.zeros(1, 384)  # DINOv2's own checkpoints have one
  path = str(tmp_path / f"dinov2{suffix}")
  if suffix == ".pth":
    torch.save(sd, path)
  else:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file(sd, path)
  net = retrieval_net.RetrievalNet(backbone="vit_s14", backbone_kwargs={"pos_grid": 4},
                                   pooling="cls")
  images = np.random.default_rng(7).integers(0, 255, (1, 70, 56, 3)).astype(np.uint8)
  variables = jax.jit(net.init)(jax.random.PRNGKey(0), jnp.asarray(images))
  variables, _ = pretrained.load_pretrained_into(variables, net, path)
  got = np.asarray(jax.jit(net.apply)(variables, jnp.asarray(images))["descriptor"])
  x = (images / 255.0 - np.asarray(backbones.IMAGENET_MEAN)) / np.asarray(backbones.IMAGENET_STD)
  cls, _ = timm_tokens(model, x.astype(np.float32))
  np.testing.assert_allclose(got, np.asarray(pooling_ops.l2n(jnp.asarray(cls))), atol=1e-5)
  assert vit.pos_grid_of(weight_files.read_torch_state_dict(path)) == (4, 384)


def test_register_tokens_are_refused():
  with pytest.raises(ValueError, match="register"):
    vit.convert_timm_vit({"reg_token": np.zeros((1, 4, 8))})


# ----------------------------------------------------------------------------------------------
# Training: a tiny ViT on the demo set, sharded over the 8 fake devices, both minings.

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "pos_grid": 2}


@pytest.mark.parametrize("mining", ["in_batch", "epoch"])
def test_tiny_vit_trains_and_evaluates(demo_root, tmp_path, mining):
  # pylint: disable=import-outside-toplevel
  from retrieval_jax import checkpointing
  from retrieval_jax.train import loop as train_loop
  import test_train
  extra = dict(test_train.EPOCH) if mining == "epoch" else {}
  c = test_train.tiny_config(demo_root, **{"train.num_steps": 2, "optim.lr": 1e-3,
                                           "model.backbone": "vit_s14",
                                           "model.backbone_kwargs": dict(TINY_VIT)}, **extra)
  if mining == "in_batch":  # evaluated on the demo's test split at the end
    c.eval.dataset, c.extract.long_side, c.eval.pictures = "demo", 64, 0
  train_loop.train_and_evaluate(c, str(tmp_path))
  state = checkpointing.read_state(str(tmp_path))
  params = state["params"]["backbone"]
  assert params["pos_embed"].shape == (1, 5, 32)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))
  fresh = networks.build_network(c.model).init(
      jax.random.PRNGKey(c.seed), jnp.zeros((1, 32, 32, 3), jnp.uint8))["params"]["backbone"]
  assert not np.allclose(params["blocks_1"]["mlp"]["fc2"]["kernel"],
                         fresh["blocks_1"]["mlp"]["fc2"]["kernel"])
  if mining == "in_batch":
    results = os.listdir(os.path.join(tmp_path, "results"))
    assert any(name.endswith(".json") for name in results), results


def test_config_checks_name_the_token_pooling_fields():
  from configs import common  # pylint: disable=import-outside-toplevel
  from retrieval_jax import config_checks  # pylint: disable=import-outside-toplevel
  c = common.base_config()
  c.model.backbone, c.model.pooling = "vit_b14", "cls_gem"
  assert not config_checks.find_problems(c, "evaluate")
  c.extract.multiscale_combine, c.model.multi_layer = "early_fusion", True
  c.model.backbone = "resnet50"
  problems = "\n".join(config_checks.find_problems(c, "evaluate"))
  assert "model.pooling='cls_gem'" in problems and "early_fusion" in problems
  c.model.backbone = "vit_s14"
  assert "model.multi_layer=True" in "\n".join(config_checks.find_problems(c, "evaluate"))
