"""One description of how images become descriptors, and what depends on it.

`descriptor_settings.build` resolves every derived value once (the dataset's EXIF rule, the
multi-scale exponent, the local settings, the export overrides); the whitening store keys
its files by the settings' digest and the weights' identity; the registries carry the
per-dataset facts; config_checks refuses bad combinations.
"""
import jax
import numpy as np
import pytest

from configs import common
from retrieval_jax import config_checks
from retrieval_jax import descriptor_settings
from retrieval_jax import multiscale
from retrieval_jax.data import datasets
from retrieval_jax.data import download
from retrieval_jax.data import protocol
from retrieval_jax.evaluation import pipeline
from retrieval_jax.evaluation import rerankers
from retrieval_jax.local import model as local_model
from retrieval_jax.models import backbones
from retrieval_jax.postprocess import whitening_store

from tiny_models import random_variables, tiny_resnet

TINY = {"width": 8, "stage_sizes": (1, 1, 1, 1)}


@pytest.fixture(scope="module")
def gem_net():
  model = tiny_resnet("gem")
  return model, random_variables(model, seed=1, p=2.5)


def _config(**extract):
  c = common.base_config()
  c.model.backbone, c.model.backbone_kwargs = "resnet18", dict(TINY)
  for k, v in extract.items():
    c.extract[k] = v
  return c


def test_build_resolves_every_derived_value_once(gem_net):
  model, variables = gem_net
  c = _config(scales=(1.0, 0.5), long_side=96)
  bench = descriptor_settings.build(c, model, variables, "roxford5k")
  user = descriptor_settings.build(c, model, variables, "")
  # EXIF "auto": the benchmark's registered rule (cirtorch never transposes), a user's
  # folder applies it; every other switch is the reference's.
  assert bench.protocol == protocol.REFERENCE and not bench.protocol.exif_transpose
  assert user.protocol.exif_transpose
  assert bench.multiscale_p == pytest.approx(2.5)  # the learned GeM p, read once
  assert (bench.long_side, bench.scales, bench.early_fusion) == (96, (1.0, 0.5), False)
  assert bench.local is None  # no local head
  fused = descriptor_settings.build(_config(multiscale_combine="early_fusion"), model,
                                    variables, "")
  assert fused.early_fusion and fused.multiscale_p is None
  assert fused.extract_kwargs()["early_fusion"] is True


def test_export_overrides_replace_only_what_is_set(gem_net):
  model, variables = gem_net
  c = _config(scales=(1.0, 0.5), long_side=96)
  c.export.long_side = 64
  got = descriptor_settings.build(c, model, variables, "", overrides=c.export)
  assert (got.long_side, got.scales, got.multiscale_combine) == (64, (1.0, 0.5), "gem")


def test_scale_gem_reaches_every_consumer_through_the_settings(gem_net):
  """sgem / sgem_power: extract_kwargs carry (infinity, sgem_p); the record keeps sgem_p
  (a describe index's queries are described alike), other settings' digests do not."""
  model, variables = gem_net
  plain = descriptor_settings.build(_config(scales=(1.0, 0.5)), model, variables, "")
  assert "scale_gem" not in plain.extract_kwargs() and "sgem_p" not in plain.record()
  for combine, infinity in (("sgem", True), ("sgem_power", False)):
    c = _config(scales=(1.0, 0.5), multiscale_combine=combine, sgem_p=7.0)
    s = descriptor_settings.build(c, model, variables, "")
    assert s.multiscale_p is None and not s.early_fusion
    assert s.extract_kwargs()["scale_gem"] == (infinity, 7.0)
    assert descriptor_settings.from_record(s.record()) == s
    assert s.digest() != plain.digest()


def test_local_settings_of_a_delg_network():
  c = _config(long_side=96)
  c.extract.local_long_side = 0  # 0: extract.long_side
  delg = local_model.DelgNet(backbone="resnet18", backbone_kwargs=TINY, num_classes=3,
                             reduced_dim=4, attention_hidden=8)
  variables = {"params": {"pool": {"p": np.full((1,), 3.0)}}}
  s = descriptor_settings.build(c, delg, variables, "demo")
  assert s.local.long_side == 96 and s.local.scales == tuple(c.extract.local_scales)


def test_digest_names_every_field_and_the_record_round_trips(gem_net):
  model, variables = gem_net
  s = descriptor_settings.build(_config(scales=(1.0, 0.5)), model, variables, "roxford5k")
  assert descriptor_settings.from_record(s.record()) == s
  changed = [s.replace(long_side=s.long_side + 1), s.replace(multiscale_p=2.0),
             s.replace(protocol=protocol.LEGACY), s.replace(rotations=False),
             s.replace(dataset="rparis6k")]
  digests = {s.digest()} | {x.digest() for x in changed}
  assert len(digests) == 1 + len(changed)
  # A describe index written before the settings object: no combine recorded.
  old = {"long_side": 96, "batch_size": 8, "scales": [1.0, 0.5], "multiscale_p": None,
         "protocol": {"query_resize": "reference", "upscale": False, "resample": "lanczos",
                      "exif_transpose": True, "multiscale_resize": "interpolate"}}
  assert descriptor_settings.from_record(old).multiscale_combine == "mean"
  assert descriptor_settings.from_record(dict(old, multiscale_p=3.0)).multiscale_combine == "gem"


def test_whitening_key_changes_with_protocol_and_weights(gem_net):
  """A stored whitening is reused only for the same settings and the same weights."""
  model, variables = gem_net
  c = _config()
  c.eval.whitening = "pca"
  key, _ = whitening_store._key(c, "pca", model, variables, step=None)  # pylint: disable=protected-access
  c.extract.resample = "bilinear"  # another input protocol: the old file is stale
  other_protocol, _ = whitening_store._key(c, "pca", model, variables, step=None)  # pylint: disable=protected-access
  c.extract.resample = "lanczos"
  moved = random_variables(model, seed=2, p=2.5)  # other weights, same (absent) step
  other_weights, _ = whitening_store._key(c, "pca", model, moved, step=None)  # pylint: disable=protected-access
  assert key["settings"] != other_protocol["settings"]
  assert key["weights"] != other_weights["weights"]
  again, _ = whitening_store._key(c, "pca", model, variables, step=None)  # pylint: disable=protected-access
  assert again == key


def test_registries_carry_the_per_dataset_facts():
  assert not datasets.DATASETS.get("roxford5k").exif_transpose
  assert not datasets.DATASETS.get("roxford5k+1m").exif_transpose
  assert datasets.DATASETS.get("holidays").exif_transpose  # its loader documents EXIF
  assert datasets.DATASETS.get("demo").exif_transpose
  assert datasets.exif_transpose("my_photos")
  # The download command knows exactly the datasets that name a download.
  assert datasets.download_names() == sorted([
      "retrieval-sfm-120k", "retrieval-sfm-30k", "roxford5k", "rparis6k", "oxford5k",
      "paris6k", "revisitop1m", "holidays", "ukbench", "gldv2"])
  with pytest.raises(ValueError, match="unknown dataset"):
    download.plan("nope")
  assert "resnet50" in backbones.BACKBONES and backbones.get_backbone("resnet50").channels == 2048
  with pytest.raises(ValueError, match="unknown backbone 'nope'"):
    backbones.get_backbone("nope")
  assert {"local", "asmk", "superglobal"} <= set(rerankers.RERANKERS.names())
  assert set(multiscale.COMBINES.names()) == {"gem", "mean", "early_fusion", "sgem",
                                              "sgem_power"}
  assert [multiscale.COMBINES.get(n).scale_gem for n in ("sgem", "sgem_power", "gem")] == [
      True, False, None]


def test_stages_off_by_config_are_reported():
  c = common.base_config()
  c.eval.qe_k, c.eval.pictures = 2, 3
  stages = pipeline.stages_of(c, whitening=None, skip=("qe_dba", "rerank"))
  assert stages.qe_k == 0 and stages.pictures == 3
  assert stages.skipped == ("qe_dba",)  # rerank was not asked for: nothing to report
  with pytest.raises(ValueError, match="not stages"):
    pipeline.stages_of(c, skip=("qe",))


@pytest.mark.parametrize("overrides, mode, message", [
    ({"extract.multiscale_combine": "max"}, "evaluate",
     "extract.multiscale_combine='max' is not one of"),
    ({"extract.multiscale_combine": "early_fusion"}, "export",
     "fuses feature maps, which the exported function does not"),
    ({"model.netvlad_init": "kmeans"}, "train", "model.netvlad_init='kmeans' learns NetVLAD"),
    ({"model.netvlad_init": "random"}, "train", "model.netvlad_init='random' is not one of"),
    ({"eval.rerank": "local"}, "evaluate", "set --config.model.local_head=delg"),
    ({"eval.rerank": "supreglobal"}, "evaluate", "eval.rerank='supreglobal' is not one of"),
    ({"model.local_head": "delg", "extract.local_iou": 0.0}, "evaluate",
     "extract.local_iou=0.0 must be in (0, 1]"),
    ({"model.local_head": "delg", "extract.local_scales": (1.0, -2.0)}, "evaluate",
     "extract.local_scales=(1.0, -2.0) must be a tuple of positive scale factors"),
    ({"model.local_head": "delg", "model.local_classifier": "svm"}, "train",
     "model.local_classifier='svm' is not one of"),
    ({"model.local_head": "delf"}, "train", "model.local_head='delf' is not one of"),
    ({"train.eval_skip": ("whiten",)}, "train", "train.eval_skip: ['whiten'] are not"),
])
def test_config_checks_refuse_bad_combinations(overrides, mode, message):
  c = common.base_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.validate(c, mode)
  assert message in str(e.value)


def test_valid_combinations_pass():
  c = common.base_config()
  c.model.local_head, c.eval.rerank = "delg", "local"
  c.extract.multiscale_combine = "early_fusion"  # DelgNet has RetrievalNet's trunk / head
  assert config_checks.find_problems(c, "evaluate") == []


def test_imported_whitening_is_used_for_the_same_weights(gem_net, tmp_path, monkeypatch):
  """A cirtorch file's meta['Lw'] is stored under the settings' and weights' key, so the
  off-the-shelf evaluation uses it (nothing is learned) on device-placed variables."""
  model, variables = gem_net
  c = _config(scales=(1.0, 0.5))
  c.eval.whitening = "learned"
  d = 8  # the tiny trunk's channels
  m, proj = np.arange(d, dtype=np.float64), np.eye(d)[::-1]

  class Imported:
    whitening = {"retrieval-SfM-120k": {"ss": (m + 1, proj), "ms": (m, proj)}}

  whitening_store.save_imported(c, str(tmp_path), Imported(), model, variables)
  monkeypatch.setattr(whitening_store, "compute_and_save",
                      lambda *a, **k: pytest.fail("learned instead of reused"))
  placed = jax.device_put(variables)
  got = whitening_store.get_or_compute(c, str(tmp_path), model, placed, None, None)
  np.testing.assert_array_equal(got["m"], m)  # the multi-scale entry, for two scales
  np.testing.assert_array_equal(got["P"], proj)
