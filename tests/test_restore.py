"""What a run starts from: NetVLAD k-means centres and the CAM classifier, through run.run.

Both runs train with lr 0, so the checkpoint holds exactly the variables the run started
from; the expectations are re-derived here without the code under test (a Lloyd fixed point
of the images' local features; the weight file's own FC tensors).
"""
import jax
import numpy as np
import pytest
import torch

from retrieval_jax import checkpointing
from retrieval_jax import restore
from retrieval_jax import run
from retrieval_jax import sharding
from retrieval_jax.data import datasets
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import tuples
from retrieval_jax.models import retrieval_net

import torch_reference as tr
from test_train import demo_root, tiny_config  # pylint: disable=unused-import


def _frozen(root, **overrides):
  """tiny_config training 1 step that changes nothing (lr 0), checkpointed at its end."""
  return tiny_config(root, **{"train.num_steps": 1, "optim.lr": 0.0,
                              "optim.weight_decay": 0.0, "data.image_size": 64}, **overrides)


def test_netvlad_run_starts_from_kmeans_centres_of_training_images(demo_root, tmp_path):
  k, count = 4, 12
  c = _frozen(demo_root, **{"model.pooling": "netvlad",
                            "model.pooling_kwargs": {"num_clusters": k, "alpha": 50.0},
                            "model.netvlad_init": "kmeans", "model.netvlad_init_images": count})
  workdir = str(tmp_path)
  run.run("train", c, workdir)
  centres = np.asarray(checkpointing.read_state(workdir)["params"]["pool"]["centroids"])
  assert centres.shape == (k, 8 * 8)

  # The same sample of training images (seeded as documented), described independently:
  # the trunk's feature map positions, L2-normalised.
  model = retrieval_net.build_retrieval_net(c.model)
  random_init = restore.init_variables(model, 64, jax.random.key(c.seed))
  images = datasets.get_dataset("demo", demo_root, "train").images
  pick = np.sort(np.random.default_rng(c.seed).choice(len(images), count, replace=False))
  ds = tuples.describe_dataset([images[i] for i in pick], np.arange(count), image_size=64,
                               batch_size=count)
  batch = next(iter(grain_pipeline.train_iterator(ds, num_threads=1)))
  fmap, fmask = model.apply(random_init, batch["image"], batch["mask"], method="trunk")[0]
  x = np.asarray(fmap).reshape(-1, fmap.shape[-1])[np.asarray(fmask).reshape(-1)]
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  assert len(x) == count * 4  # 2 x 2 positions per 64 px image

  # k-means centres: every centre is the mean of the descriptors nearest to it (a Lloyd
  # fixed point), which random unit centres are not.
  def lloyd_gap(cent):
    nearest = np.argmin(((x[:, None] - cent[None]) ** 2).sum(-1), axis=1)
    return max(np.abs(x[nearest == j].mean(0) - cent[j]).max() if (nearest == j).any()
               else np.inf for j in range(k))
  assert lloyd_gap(centres) < 1e-4
  assert lloyd_gap(np.asarray(random_init["params"]["pool"]["centroids"])) > 1e-2


@pytest.fixture(scope="module")
def resnet_with_classifier(tmp_path_factory):
  """A torchvision-layout ResNet-18 (width 8) .pth with its ImageNet FC (1000 classes)."""
  torch.manual_seed(0)
  net = tr.randomize_batch_norm(tr.ResNet(18, width=8)).eval()
  path = str(tmp_path_factory.mktemp("weights") / "resnet18_w8.pth")
  torch.save(net.state_dict(), path)
  return net, path


def test_seddati_cam_run_loads_its_classifier_from_the_weight_file(demo_root, tmp_path,
                                                                    resnet_with_classifier):
  net, path = resnet_with_classifier
  c = _frozen(demo_root, **{"model.pooling": "seddati_cam", "model.pooling_kwargs": {},
                            "model.pretrained": path,
                            "model.backbone_kwargs": {"bn_mode": "frozen_stats", "width": 8}})
  workdir = str(tmp_path / "train")
  run.run("train", c, workdir)
  pool = checkpointing.read_state(workdir)["params"]["pool"]
  np.testing.assert_array_equal(pool["class_kernel"], net.fc.weight.detach().numpy().T)
  np.testing.assert_array_equal(pool["class_bias"], net.fc.bias.detach().numpy())

  # Off the shelf (no checkpoint): the restored network holds the same classifier.
  restored = restore.restore_model(c, str(tmp_path / "fresh"), sharding.make_mesh())
  assert restored.source == restore.PRETRAINED and restored.step is None
  np.testing.assert_array_equal(restored.variables["params"]["pool"]["class_kernel"],
                                net.fc.weight.detach().numpy().T)


def test_seddati_cam_classifier_of_another_size_is_refused_with_the_fix(tmp_path):
  torch.manual_seed(1)
  net = tr.ResNet(18, num_classes=10, width=8).eval()
  path = str(tmp_path / "ten_classes.pth")
  torch.save(net.state_dict(), path)
  model = retrieval_net.RetrievalNet(backbone="resnet18", backbone_kwargs={"width": 8},
                                     pooling="seddati_cam")
  variables = {"params": {"pool": {"class_kernel": np.zeros((64, 1000), np.float32),
                                   "class_bias": np.zeros((1000,), np.float32)}}}
  with pytest.raises(ValueError, match="num_classes=10"):
    restore.with_cam_classifier(variables, model, path)
  gem = model.clone(pooling="gem")
  assert restore.with_cam_classifier(variables, gem, path) is variables
