"""Every experiment config loads, builds its network, and trains a tiny version of itself.

Tiny version: the config's own pooling, loss, optimiser and input kind (epoch tuples, K x M
batches, shuffled batches), on the demo set, with a ResNet-18 of width 8 at 32 px, 2 steps.
The full-size network is only shape-checked (`jax.eval_shape`: no weights read, no FLOPs).
"""
import glob
import importlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from retrieval_jax import losses
from retrieval_jax.data import demo
from retrieval_jax.models import backbones
from retrieval_jax.models import retrieval_net
from retrieval_jax.train import inputs as inputs_lib
from retrieval_jax.train import loop as train_loop


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
               if not os.path.basename(p).startswith(("_", "common")))


def load(name: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo"))
  demo.build(root, seed=0)
  return root


def test_every_experiment_is_listed():
  assert {"demo", "gem_resnet101", "gem_vgg16", "rmac_resnet101", "netvlad_vgg16",
          "msnetvlad_resnet50", "arcface_gldv2_resnet50"} <= set(NAMES)


def _lists(node, path=""):
  if isinstance(node, ml_collections.ConfigDict):
    for k, v in node.items():
      yield from _lists(v, f"{path}.{k}")
  elif isinstance(node, list):
    yield path


@pytest.mark.parametrize("name", NAMES)
def test_config_documents_itself_and_builds_its_network(name):
  module = importlib.import_module(f"configs.{name}")
  doc = module.__doc__ or ""
  assert f"--config=configs/{name}.py" in doc, "the docstring gives the exact command"
  # The demo's result is in the README; a config over the user's own photos has none.
  assert name in ("demo", "folder") or "Expected result" in doc
  c = load(name)
  assert not list(_lists(c)), "configs hold tuples, not lists"
  locked = ml_collections.FrozenConfigDict(c)  # every reference resolves
  assert locked.loss.name in losses.LOSSES
  assert locked.train.mining in inputs_lib.INPUTS
  model = retrieval_net.build_retrieval_net(c.model)
  spec = backbones.get_backbone(c.model.backbone)
  s = c.data.image_size
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3), jnp.uint8))
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, s, s, 3), jnp.uint8))
  dim = out["descriptor"].shape
  assert dim[0] == 2 and dim[1] > 0
  if c.model.whitening_dim:
    assert dim[1] == c.model.whitening_dim
  elif c.model.pooling in ("gem", "mac", "spoc", "rmac"):
    assert dim[1] == spec.channels


def tiny(c: ml_collections.ConfigDict, root: str) -> ml_collections.ConfigDict:
  """The same experiment, small: demo data, tiny trunk, 32 px, 2 steps, no evaluation."""
  c.data.name, c.data.split, c.data.root = "demo", "train", root
  c.data.image_size = 32 if c.model.pooling != "ms_netvlad" else 64
  c.data.num_threads = 2
  c.data.classes_per_batch, c.data.images_per_class, c.data.batch_size = 4, 2, 16
  c.data.query_size, c.data.pool_size = 16, 60
  c.data.tuples_per_batch = min(c.data.tuples_per_batch, 5)
  c.model.backbone = "resnet18"
  c.model.backbone_kwargs = {"bn_mode": c.model.backbone_kwargs.get("bn_mode", "frozen_stats"),
                             "width": 8, "stage_sizes": (1, 1, 1, 1)}
  c.model.pretrained = ""
  c.loss.num_negatives = min(c.loss.num_negatives, 2)
  c.train.num_steps, c.train.num_epochs = 2, 0
  c.train.checkpoint_every, c.train.log_every, c.train.eval_before = 100, 1, False
  c.optim.warmup_steps = 0
  c.extract.batch_size = 8
  c.eval.dataset = ""
  return c


@pytest.mark.parametrize("name", NAMES)
def test_tiny_version_trains_two_steps(name, demo_root, tmp_path):
  c = tiny(load(name), demo_root)
  train_loop.train_and_evaluate(c, str(tmp_path))
  lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert [m["step"] for m in lines] == [1, 2]
  assert all(np.isfinite(m["loss"]) for m in lines)
