"""CVNet global checkpoints by file (models/cvnet.py): a randomly initialised network in
CVNet's layout (tests/cvnet_reference.py, transcribed from sungonce/CVNet) is written as its
`model_state`, imported through `model.pretrained`, and gives the reference's descriptors,
with CVNet's head and with SuperGlobal's GeM+ / regional GeM on top."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import common
from retrieval_jax import restore
from retrieval_jax import sharding
from retrieval_jax.models import cvnet
from retrieval_jax.models import pretrained
from retrieval_jax.models import retrieval_net

sys.path.insert(0, os.path.dirname(__file__))
import cvnet_reference as ref  # pylint: disable=wrong-import-position
import superglobal_reference as sg_ref  # pylint: disable=wrong-import-position

REDUCTION = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  net = ref.ResNet(50, REDUCTION).eval()
  with torch.no_grad():
    for name, module in net.named_modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.1, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.0)
        module.bias.uniform_(-0.1, 0.1)
      del name
    net.head.pool.p.fill_(2.7)
  state = {f"encoder_q.{k}": v for k, v in net.state_dict().items()}
  state["conv2ds.0.weight"] = torch.randn(256, 1024, 3, 3)  # CVNet's re-ranker: left out
  state["cv_learner.encoder_layer4.0.weight"] = torch.randn(4)
  path = str(tmp_path_factory.mktemp("cvnet") / "CVPR2022_CVNet_R50.pyth")
  torch.save({"model_state": state, "epoch": 1}, path)
  return net, path


def _images():
  return np.random.default_rng(1).integers(0, 255, (2, 72, 88, 3)).astype(np.uint8)


def _load(path, **kw):
  model = retrieval_net.RetrievalNet(backbone="resnet50", pooling="gem",
                                     whitening_dim=REDUCTION, **kw)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))
  variables, imported = pretrained.load_pretrained_into(variables, model, path)
  return model, variables, imported


def test_cvnet_checkpoint_gives_the_reference_descriptor(checkpoint):
  net, path = checkpoint
  model, variables, imported = _load(path)
  assert imported.backbone == "resnet50" and imported.whitening_dim == REDUCTION
  assert imported.pooling_kwargs["p_init"] == pytest.approx(2.7)
  images = _images()
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images))["descriptor"])
  with torch.no_grad():
    want = net.superglobal_singlescale(ref.bgr_input(images)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_superglobal_relup_gem_plus_and_regional_gem_on_cvnet(checkpoint):
  """SuperGlobal's single-scale descriptor: in-trunk ReLU+, regional GeM, GeM+, reduction."""
  net, path = checkpoint
  model, variables, _ = _load(path, pooling_kwargs={"p_init": 4.6, "trainable": False,
                                                    "eps": 1e-8}, regional_gem=True,
                              backbone_kwargs={"superglobal_relup": 0.014})
  assert "pool" not in variables["params"]  # GeM+: the file's p is not used
  relup_net = ref.ResNet(50, REDUCTION, relup=True).eval()
  relup_net.load_state_dict(net.state_dict())  # ReLU+ holds no weights
  images = _images()
  apply = jax.jit(model.apply)
  got = np.asarray(apply(variables, jnp.asarray(images))["descriptor"])
  with torch.no_grad():
    want = relup_net.superglobal_singlescale(ref.bgr_input(images), sg_ref.gemp(4.6, 1e-8),
                                             sg_ref.rgem(2.5, 5)).numpy()
    plain = net.superglobal_singlescale(ref.bgr_input(images), sg_ref.gemp(4.6, 1e-8),
                                        sg_ref.rgem(2.5, 5)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.abs(want - plain).max() > 1e-3  # the in-trunk ReLU+ changes the descriptor
  # A padded batch: the floor does not leak into the padding.
  padded = images.copy()
  padded[0] = 0
  padded[0, :50, :70] = images[0, :50, :70]
  mask = np.zeros(images.shape[:3], bool)
  mask[0, :50, :70] = True
  mask[1] = True
  got = np.asarray(apply(variables, jnp.asarray(padded), jnp.asarray(mask))["descriptor"])
  alone = np.asarray(apply(variables, jnp.asarray(images[:1, :50, :70]))["descriptor"])
  np.testing.assert_allclose(got[0], alone[0], atol=1e-5)


def test_model_pretrained_path_and_mismatch_message(checkpoint, tmp_path):
  _, path = checkpoint
  c = common.base_config()
  c.model.backbone, c.model.pretrained, c.model.whitening_dim = "resnet50", path, REDUCTION
  c.eval.dataset = ""
  model, variables, step, source = restore.restore_model(c, str(tmp_path), sharding.make_mesh())
  assert source == restore.PRETRAINED and step is None
  assert variables["params"]["whiten"]["kernel"].shape == (2048, REDUCTION)
  assert model.whitening_dim == REDUCTION
  with pytest.raises(ValueError, match="model.whitening_dim=64"):
    _load_wrong(path)


def _load_wrong(path):
  model = retrieval_net.RetrievalNet(backbone="resnet50", pooling="gem", whitening_dim=0)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 64, 64, 3), jnp.uint8))
  pretrained.load_pretrained_into(variables, model, path)


def test_unknown_tensors_are_refused():
  with pytest.raises(ValueError, match="unexpected CVNet tensor"):
    cvnet.convert_cvnet({"encoder_q.stem.conv.weight": np.zeros((64, 3, 7, 7)),
                         "encoder_q.s5.b1.f.a.weight": np.zeros(1),
                         "encoder_q.head.fc.weight": np.zeros((2, 2048))})
