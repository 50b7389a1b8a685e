"""Weight import: cnnimageretrieval-pytorch checkpoints, timm ResNets (safetensors), safety.

The cirtorch checkpoints are synthetic but complete: a torch network laid out as cirtorch's
`ImageRetrievalNet` (features / pool / whiten), its `state_dict`, a `meta` dict and an Adam
state saved with `torch.save`, as cirtorch's train.py writes them. Imported, they must give
the torch network's descriptors.
"""
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # pylint: disable=g-import-not-at-top
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as tr  # pylint: disable=g-import-not-at-top,wrong-import-position

from retrieval_jax import errors  # pylint: disable=g-import-not-at-top
from retrieval_jax.models import cirtorch  # pylint: disable=g-import-not-at-top
from retrieval_jax.models import pretrained  # pylint: disable=g-import-not-at-top
from retrieval_jax.models import resnet  # pylint: disable=g-import-not-at-top
from retrieval_jax.models import retrieval_net  # pylint: disable=g-import-not-at-top
from retrieval_jax.models import weight_files  # pylint: disable=g-import-not-at-top

torch.set_num_threads(2)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class GeM(nn.Module):
  """cirtorch.layers.pooling.GeM."""

  def __init__(self, p=3.0, eps=1e-6):
    super().__init__()
    self.p = nn.Parameter(torch.ones(1) * p)
    self.eps = eps

  def forward(self, x):
    return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p),
                        (x.size(-2), x.size(-1))).pow(1. / self.p)


class MAC(nn.Module):

  def forward(self, x):
    return F.max_pool2d(x, (x.size(-2), x.size(-1)))


def l2n(x, eps=1e-6):
  return x / (torch.norm(x, p=2, dim=1, keepdim=True) + eps)


class CirtorchNet(nn.Module):
  """cirtorch's ImageRetrievalNet.forward: features -> pool -> L2N (-> whiten -> L2N)."""

  def __init__(self, features, pool, whiten=None):
    super().__init__()
    self.features = nn.Sequential(*features)
    self.pool = pool
    self.whiten = whiten

  def forward(self, x):
    o = l2n(self.pool(self.features(x))).squeeze(-1).squeeze(-1)
    if self.whiten is not None:
      o = l2n(self.whiten(o))
    return o


def save_cirtorch(path, net, meta):
  """What cirtorch's train.py saves: epoch, meta, state_dict, min_loss, optimizer."""
  opt = torch.optim.Adam(net.parameters(), lr=1e-6)
  net(torch.randn(1, 3, 64, 64)).sum().backward()
  opt.step()
  torch.save({"epoch": 3, "meta": meta, "state_dict": net.state_dict(), "min_loss": 0.25,
              "optimizer": opt.state_dict()}, path)


def meta_of(arch, pooling, whitening, dim, **extra):
  return dict({"architecture": arch, "local_whitening": False, "pooling": pooling,
               "regional": False, "whitening": whitening, "mean": MEAN, "std": STD,
               "outputdim": dim}, **extra)


def photo(h=72, w=96):
  from skimage import data  # pylint: disable=import-outside-toplevel
  return np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.BILINEAR))


def torch_descriptor(net, image):
  x = (image.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(
      STD, np.float32)
  with torch.no_grad():
    return net.eval()(torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()).numpy()[0]


@pytest.fixture(scope="module")
def cirtorch_resnet(tmp_path_factory):
  torch.manual_seed(0)
  trunk = tr.randomize_batch_norm(tr.ResNet(18, width=8))
  net = CirtorchNet(list(trunk.children())[:-2], GeM(2.7), nn.Linear(64, 64)).eval()
  path = str(tmp_path_factory.mktemp("cirtorch") / "retrievalSfM120k-resnet18-gem.pth")
  lw = {"retrieval-SfM-120k": {"ss": {"m": np.random.RandomState(0).randn(64, 1),
                                      "P": np.eye(64)},
                               "ms": {"m": np.zeros((64, 1)), "P": 2 * np.eye(64)}}}
  save_cirtorch(path, net, meta_of("resnet18", "gem", True, 64, Lw=lw))
  return net, path


def test_cirtorch_resnet_gem_whiten_gives_the_torch_descriptor(cirtorch_resnet):
  net, path = cirtorch_resnet
  imported = cirtorch.load_cirtorch(path)
  assert (imported.backbone, imported.pooling, imported.whitening_dim) == ("resnet18", "gem", 64)
  assert imported.pooling_kwargs["p_init"] == pytest.approx(2.7)
  np.testing.assert_allclose(imported.variables["params"]["whiten"]["kernel"],
                             net.whiten.weight.detach().numpy().T)
  model = retrieval_net.RetrievalNet(
      backbone="resnet18", backbone_kwargs={"width": 8}, pooling="gem",
      pooling_kwargs=imported.pooling_kwargs, whitening_dim=64, mean=imported.mean,
      std=imported.std)
  image = photo()
  got = np.asarray(model.apply(imported.variables, image[None])["descriptor"])[0]
  np.testing.assert_allclose(got, torch_descriptor(net, image), atol=2e-5)
  # The precomputed whitening of meta['Lw'] comes along as numpy (m [D], P [D, D]).
  m, p = imported.whitening["retrieval-SfM-120k"]["ss"]
  assert m.shape == (64,) and p.shape == (64, 64)
  assert set(imported.whitening["retrieval-SfM-120k"]) == {"ss", "ms"}


def test_load_pretrained_into_model_variables_and_config_check(cirtorch_resnet):
  net, path = cirtorch_resnet
  model = retrieval_net.RetrievalNet(backbone="resnet18", backbone_kwargs={"width": 8},
                                     pooling="gem", whitening_dim=64)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))
  variables, imported = pretrained.load_pretrained_into(shapes, model, path)
  assert imported is not None
  image = photo(64, 80)
  got = np.asarray(model.apply(variables, image[None])["descriptor"])[0]
  np.testing.assert_allclose(got, torch_descriptor(net, image), atol=2e-5)
  wrong = model.clone(pooling="mac")
  with pytest.raises(ValueError, match="--config.model.pooling=gem"):
    pretrained.load_pretrained_into(shapes, wrong, path)
  # The trunk alone, as restore.init_variables and the .npz converter read it.
  trunk = pretrained.load_backbone_variables("resnet18", path)
  np.testing.assert_array_equal(trunk["params"]["stem"]["conv"]["kernel"],
                                variables["params"]["backbone"]["stem"]["conv"]["kernel"])


def test_cirtorch_vgg16_mac_gives_the_torch_descriptor(tmp_path):
  torch.manual_seed(1)
  vgg = tr.VGG16(width=8)
  net = CirtorchNet(list(vgg.features.children())[:-1], MAC()).eval()
  path = str(tmp_path / "vgg.pth")
  save_cirtorch(path, net, meta_of("vgg16", "mac", False, 64))
  imported = cirtorch.load_cirtorch(path)
  assert imported.whitening_dim == 0 and imported.whitening == {}
  assert "pool" not in imported.variables["params"]
  model = retrieval_net.RetrievalNet(backbone="vgg16", backbone_kwargs={"width": 8},
                                     pooling="mac")
  image = photo(80, 64)
  got = np.asarray(model.apply(imported.variables, image[None])["descriptor"])[0]
  np.testing.assert_allclose(got, torch_descriptor(net, image), atol=2e-5)


class NotData:
  """Any class: a weights-only load must refuse to build it."""


def test_checkpoint_with_objects_is_refused(tmp_path):
  path = str(tmp_path / "evil.pth")
  torch.save({"state_dict": {}, "meta": {"architecture": "resnet18", "x": NotData()}}, path)
  # Refused as "not a weight file", never with torch's advice to set weights_only=False.
  with pytest.raises(errors.NotAWeightFileError, match="Python objects other than tensors"):
    cirtorch.load_cirtorch(path)


@pytest.mark.parametrize("meta_extra,keys,match", [
    ({"regional": True}, (), "regional"),
    ({"local_whitening": True}, (), "local whitening"),
    ({"architecture": "alexnet"}, (), "not supported"),
    ({}, ("extra.weight",), "do not convert"),
])
def test_unsupported_cirtorch_networks_fail_clearly(cirtorch_resnet, meta_extra, keys, match):
  net, _ = cirtorch_resnet
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  sd.update({k: np.zeros(3, np.float32) for k in keys})
  with pytest.raises(ValueError, match=match):
    cirtorch.convert_cirtorch(sd, meta_of("resnet18", "gem", True, 64, **meta_extra))


# ----------------------------------------------------------------------------------------------
# timm / Hugging Face hub files.

_ST_DTYPES = {np.dtype("float32"): "F32", np.dtype("int64"): "I64", np.dtype("float16"): "F16"}


def write_safetensors(path, tensors, bf16=()):
  """A minimal safetensors writer (8-byte header size, JSON header, raw bytes)."""
  header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, value in tensors.items():
    value = np.ascontiguousarray(value)
    if name in bf16:
      raw, dtype = (value.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes(), "BF16"
    else:
      raw, dtype = value.tobytes(), _ST_DTYPES[value.dtype]
    header[name] = {"dtype": dtype, "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_timm_resnet_safetensors_loads_with_torchvision_names(tmp_path):
  """timm's plain ResNet keys are torchvision's (conv1, bn1, layer1.0.conv1, ..., fc)."""
  torch.manual_seed(2)
  ref = tr.randomize_batch_norm(tr.ResNet(18, width=8)).eval()
  sd = {f"module.{k}": v.numpy() for k, v in ref.state_dict().items()}  # DataParallel prefix
  path = str(tmp_path / "model.safetensors")
  write_safetensors(path, sd)
  variables = pretrained.load_backbone_variables("resnet18", path)
  image = photo()
  x = (image.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(
      STD, np.float32)
  got = resnet.ResNet(depth=18, width=8).apply(variables, x[None])["feature_map"]
  with torch.no_grad():
    want = ref.features(torch.from_numpy(x).permute(2, 0, 1)[None].contiguous())[1]
  np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_safetensors_reader_dtypes_and_deep_stem_refusal(tmp_path):
  rng = np.random.RandomState(0)
  x = rng.randn(3, 5).astype(np.float32)
  path = str(tmp_path / "t.safetensors")
  write_safetensors(path, {"a": x, "b": x, "n": np.arange(4, dtype=np.int64),
                           "h": x.astype(np.float16)}, bf16=("b",))
  got = weight_files.read_safetensors(path)
  np.testing.assert_array_equal(got["a"], x)
  np.testing.assert_allclose(got["b"], x, rtol=1e-2)  # bfloat16 keeps 8 bits of mantissa
  np.testing.assert_array_equal(got["n"], np.arange(4))
  np.testing.assert_array_equal(got["h"], x.astype(np.float16))
  deep = str(tmp_path / "resnet50d.safetensors")
  write_safetensors(deep, {"conv1.0.weight": np.zeros((32, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match="deep stem"):
    pretrained.load_backbone_variables("resnet50", deep)


def test_fine_tuning_starts_from_a_cirtorch_checkpoint(cirtorch_resnet):
  """model.pretrained = a cirtorch file: training starts with its trunk, GeM p and whitening."""
  from retrieval_jax import restore  # pylint: disable=import-outside-toplevel
  net, path = cirtorch_resnet
  model = retrieval_net.RetrievalNet(backbone="resnet18", backbone_kwargs={"width": 8},
                                     pooling="gem", whitening_dim=64)
  variables = restore.init_variables(model, 64, jax.random.key(0), path)
  np.testing.assert_allclose(np.asarray(variables["params"]["pool"]["p"]).ravel(),
                             net.pool.p.detach().numpy().ravel(), rtol=1e-6)
  np.testing.assert_allclose(variables["params"]["whiten"]["kernel"],
                             net.whiten.weight.detach().numpy().T, rtol=1e-6)
