"""The evaluation pipeline: every stage gets the previous stage's descriptors and ranking.

A tiny random network on five photos (two landmarks' views); a probe re-ranker registered
for the test records what the re-ranking stage receives. Also: DelgNet is a RetrievalNet
plus a local head (parameter layout of older checkpoints, early fusion).
"""
import copy

import jax
import numpy as np
import pytest

from configs import common
from retrieval_jax import descriptor_settings
from retrieval_jax import evaluation
from retrieval_jax import extract
from retrieval_jax import sharding
from retrieval_jax.data import datasets
from retrieval_jax.evaluation import local_rerankers
from retrieval_jax.evaluation import pipeline
from retrieval_jax.evaluation import query_expansion
from retrieval_jax.evaluation import rerankers
from retrieval_jax.evaluation import test_set as test_set_lib
from retrieval_jax.local import model as local_model

from test_extract import photos  # pylint: disable=unused-import
from tiny_models import random_variables, tiny_resnet

TINY = {"width": 8, "stage_sizes": (1, 1, 1, 1)}
SEEN = {}


@rerankers.RERANKERS.register("reversed_head_for_tests")
def _probe(context, stage):
  """Records its input; returns the head of 2 reversed."""
  SEEN.update(stage=stage, context=context)
  ranks = np.array(stage.ranking.ranks, copy=True)
  ranks[:2] = ranks[1::-1]
  return rerankers.Reranked(evaluation.Ranking(ranks), "probe", {"calls": 1.0})


@pytest.fixture(scope="module")
def world(photos):
  model = tiny_resnet("gem")
  variables = random_variables(model, seed=3, p=3.0)
  mesh = sharding.make_mesh(devices=jax.devices()[:min(8, jax.device_count())])
  labels = np.array([0, 1, 0, 1, 2])
  rset = datasets.RetrievalSet(name="photos", query_images=photos[:2], db_images=photos,
                               query_labels=labels[:2], db_labels=labels)
  c = common.base_config()
  c.extract.long_side, c.extract.batch_size = 48, 8
  return c, model, variables, mesh, test_set_lib.check(rset)


def test_each_stage_gets_the_previous_stages_output(world, tmp_path):
  c, model, variables, mesh, test = world
  settings = descriptor_settings.build(c, model, variables, "photos")
  context = rerankers.Context(c, str(tmp_path), "probe", model, variables, mesh, settings,
                              test)
  stages = pipeline.Stages(qe_k=1, qe_alpha=3.0, dba_k=2, dba_alpha=3.0,
                           rerank="reversed_head_for_tests")
  result = pipeline.evaluate(context, stages)
  # The global stage: the settings' extraction, nothing else.
  q = extract.extract_descriptors(model, variables, test.dataset.query_images, mesh=mesh,
                                  **settings.extract_kwargs())
  db = extract.extract_descriptors(model, variables, test.dataset.db_images, mesh=mesh,
                                   **settings.extract_kwargs())
  # The re-ranker got the QE/DBA stage's descriptors and their ranking, not new ones.
  db2 = query_expansion.alpha_database_augmentation(db, 2, 3.0)
  q2 = query_expansion.alpha_query_expansion(q, db2, 1, 3.0)
  stage = SEEN["stage"]
  assert stage.name == "rerank"
  np.testing.assert_allclose(stage.q, q2, atol=1e-6)
  np.testing.assert_allclose(stage.db, db2, atol=1e-6)
  want = np.argsort(-(q2.astype(np.float64) @ db2.astype(np.float64).T), axis=1,
                    kind="stable").T
  np.testing.assert_array_equal(stage.ranking.ranks, want)
  assert SEEN["context"].settings is settings
  # Its ranking is scored by the same evaluator, with its suffix and label.
  flipped = want.copy()
  flipped[:2] = want[1::-1]
  labels, printed = evaluation.get_evaluator("labels")
  gt = test_set_lib.ground_truth(test.dataset)
  assert result["mAP_reversed_head_for_tests"] == labels.score(
      printed, evaluation.Ranking(flipped), gt)["mAP"]
  assert result["calls_reversed_head_for_tests"] == 1.0
  assert any("+ probe:" in line for line in result["lines"])
  assert (tmp_path / "results" / "probe.json").exists()


def test_delg_net_keeps_the_layout_and_fuses_scales(world):
  c, _, _, mesh, test = world
  kw = dict(backbone="resnet18", backbone_kwargs=TINY, pooling="gem", whitening_dim=8)
  delg = local_model.DelgNet(num_classes=3, reduced_dim=4, attention_hidden=8, **kw)
  variables = random_variables(delg, seed=4, p=3.0)
  glob = tiny_resnet("gem", whitening_dim=8)
  # Checkpoints written before DelgNet composed RetrievalNet: the same parameter tree,
  # RetrievalNet's under the same names plus "local_head".
  assert set(variables["params"]) == {"backbone", "pool", "whiten", "local_head"}
  glob_vars = {k: {name: v for name, v in variables[k].items() if name != "local_head"}
               for k in ("params", "batch_stats")}
  want_tree = jax.tree_util.tree_structure(random_variables(glob, seed=4, p=3.0))
  assert jax.tree_util.tree_structure(glob_vars) == want_tree
  # Early fusion with a local head (it had no trunk / head before): RetrievalNet's numbers.
  images = test.dataset.db_images[:3]
  fused = dict(long_side=48, scales=(1.0, 0.5), early_fusion=True, mesh=mesh)
  got = extract.extract_descriptors(delg, variables, images, **fused)
  ref = extract.extract_descriptors(glob, glob_vars, images, **fused)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_local_features_of_two_splits_share_a_workdir(world, tmp_path):
  """A threshold chosen on 'val' then applied to 'test' in one workdir: each split keeps
  its own local-feature folders (one folder per set name refused the second split)."""
  c, _, _, mesh, test = world
  kw = dict(backbone="resnet18", backbone_kwargs=TINY, pooling="gem", whitening_dim=8)
  delg = local_model.DelgNet(num_classes=3, reduced_dim=4, attention_hidden=8, **kw)
  variables = random_variables(delg, seed=4, p=3.0)
  c = copy.deepcopy(c)
  c.model.local_head = "delg"
  c.extract.local_long_side, c.extract.local_scales = 48, (1.0,)
  settings = descriptor_settings.build(c, delg, variables, "photos")
  assert settings.local is not None
  images = test.dataset.db_images
  val = test_set_lib.check(datasets.RetrievalSet(
      name="photos", query_images=images[2:3], db_images=images[1:4],
      query_labels=np.array([0]), db_labels=np.array([1, 0, 1])), split="val")
  folders = {}
  for t in (test, val):
    q_store, db_store = local_rerankers.extract_local_features(
        delg, variables, mesh, settings, t.dataset, workdir=str(tmp_path), tag="w",
        prefix=t.prefix)
    assert (len(q_store), len(db_store)) == (len(t.dataset.query_images),
                                             len(t.dataset.db_images))
    folders[t.split] = (str(q_store.folder), str(db_store.folder))
  assert folders["test"][1].endswith("photos_db")
  assert folders["val"][1].endswith("photos-val_db")
