"""--mode=compile (retrieval_jax/aot/): the run's programs compiled for TPU topologies on CPU.

Tiny configs (tests/tiny_models.py's ResNet at width 8, 64 px), so each TPU compile takes
seconds; libtpu (a test requirement) provides the topologies. This file is also a config
file: `main.py --config=tests/test_compile.py` loads `get_config()` below.
"""
import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import common
from retrieval_jax import config_checks
from retrieval_jax import networks
from retrieval_jax.aot import collectives
from retrieval_jax.aot import mode
from retrieval_jax.aot import programs
from retrieval_jax.aot import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  """A tiny in-batch mining run: ResNet-18 layout at width 8, 64 px, 8 x 4 images."""
  c = common.base_config()
  c.data.image_size = 64
  c.data.classes_per_batch = 8
  c.data.images_per_class = 4
  c.model.backbone = "resnet18"
  c.model.backbone_kwargs = ml_collections.ConfigDict(
      {"bn_mode": "frozen_stats", "width": 8, "stage_sizes": (1, 1, 1, 1)})
  c.model.pooling = "gem"
  c.loss.name = "contrastive"
  c.loss.num_negatives = 5
  c.extract.long_side = 64
  c.extract.batch_size = 8
  c.compile.topology = "v5e:2x2"
  c.compile.programs = ("train", "extract", "search")
  c.compile.extract_buckets = "largest"
  c.compile.search_db_size = 4096
  c.compile.search_queries = 64
  c.compile.search_query_batch = 64
  c.compile.search_k = 10
  return c


def _run(tmp_path, **overrides):
  c = get_config()
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  config_checks.validate(c, "compile")
  summary = mode.run(c, str(tmp_path))
  with open(summary["report"]) as f:
    return json.load(f)


def _finite(v):
  return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.parametrize("topology,chips", [("v5e:2x2", 4), ("v5e:4x4", 16)])
def test_tiny_train_extract_search_compile_with_every_field(tmp_path, topology, chips):
  r = _run(tmp_path, **{"compile.topology": topology})
  assert os.path.exists(tmp_path / "compile" / f"{topology.replace(':', '_')}.json")
  assert r["chips"] == chips and r["chip"]["name"] == "v5e"
  names = [e["program"] for e in r["programs"]]
  assert names == ["train", "extract_64x64", "search"], names
  for e in r["programs"]:
    for field in report.FIELDS:
      assert field in e, (e["program"], field)
    assert e["fits"] is True and e["hbm_capacity_bytes"] == 16 * 2 ** 30
    for field in ("hbm_bytes_per_chip", "flops_per_chip", "bytes_accessed", "roofline_seconds",
                  "predicted_images_per_second", "predicted_mfu", "hbm_traffic_bytes",
                  "roofline_hbm_only_seconds"):
      assert _finite(e[field]) and e[field] > 0, (e["program"], field, e[field])
    assert e["optimal_seconds"] is None or e["optimal_seconds"] > 0
    assert 0 < e["predicted_mfu"] <= 1
    assert set(e["collectives"]) == set(collectives.KINDS)
  train = r["programs"][0]
  # The batch of 32 splits over the chips; the state (params + Adam's two moments, float32,
  # replicated) is an argument of every chip: counted here from the model's own shapes.
  assert train["batch_per_chip"] == 32 // chips
  model = networks.build_network(get_config().model)
  params = programs.abstract_variables(model, 64)["params"]
  param_bytes = sum(4 * int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  assert train["memory_breakdown_bytes"]["argument"] >= 3 * param_bytes
  # Data parallelism: the gradients are summed over the chips, the mining gathers the batch.
  assert train["collectives"]["all-reduce"]["count"] >= 1
  assert "data" in train["collectives"]["all-reduce"]["axes"]
  assert train["collectives"]["all-gather"]["count"] >= 1


def test_over_large_batch_fails_with_one_line_and_exit_2(tmp_path):
  out = subprocess.run(
      [sys.executable, "main.py", "--config=tests/test_compile.py",
       f"--workdir={tmp_path}", "--mode=compile", "--config.compile.programs=('train',)",
       "--config.compile.batch_per_chip=16384", "--config.data.image_size=256"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  assert "program train" in errors[0] and "GiB of HBM per chip" in errors[0]
  assert "16 GiB" in errors[0] and "batch_per_chip" in errors[0]


def _slice_crossing(entry, kind):
  return [op for op in entry["collective_ops"] if op["kind"] == kind and "slice" in op["axes"]]


def test_two_slices_keep_the_mining_all_gather_inside_a_slice(tmp_path):
  within = _run(tmp_path / "slice", **{"compile.num_slices": 2, "compile.programs": ("train",),
                                        "loss.mining_scope": "slice"})
  across = _run(tmp_path / "global", **{"compile.num_slices": 2, "compile.programs": ("train",),
                                         "loss.mining_scope": "global"})
  assert within["mesh"] == {"slice": 2, "data": 4} and within["chips"] == 8
  w, a = within["programs"][0], across["programs"][0]
  # The gradient all-reduce spans both slices either way.
  assert _slice_crossing(w, "all-reduce") and _slice_crossing(a, "all-reduce")
  # The mining all-gather: replica groups inside one slice when asked, across slices if not.
  assert not _slice_crossing(w, "all-gather"), w["collective_ops"]
  assert any(op["group"] >= 1 for op in w["collective_ops"] if op["kind"] == "all-gather")
  assert _slice_crossing(a, "all-gather"), a["collective_ops"]


def test_parse_replica_groups_iota_and_listed():
  line = "x = f32[8]{0} all-gather(f32[2]{0} y), replica_groups=[2,4]<=[4,2]T(1,0), dims={0}"
  assert collectives.parse_groups(line, 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
  line = "x = f32[8]{0} all-reduce(f32[8]{0} y), replica_groups={{0,1},{2,3}}, to_apply=add"
  groups = collectives.parse_groups(line, 4)
  assert groups == [[0, 1], [2, 3]]
  assert collectives.axes_crossed(groups, (2, 2), ("slice", "data")) == ["data"]
  assert collectives.axes_crossed([[0, 2], [1, 3]], (2, 2), ("slice", "data")) == ["slice"]


def test_hbm_traffic_counts_only_memory_space_0():
  """Operands and results in HBM count; those the TPU compiler keeps on chip (S(1)) do not;
  async copies count at their start (read) and done (write); a loop body counts once."""
  from retrieval_jax.aot import hbm  # pylint: disable=import-outside-toplevel
  text = """HloModule m

%fused (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  ROOT %n = f32[256]{0} negate(%p)
}

%body (t: (f32[256])) -> (f32[256]) {
  %t = (f32[256]{0}) parameter(0)
  %g = f32[256]{0} get-tuple-element(%t), index=0
  %f2 = bf16[512]{0:S(1)} fusion(%g), kind=kLoop, calls=%fused
  ROOT %r = (f32[256]{0}) tuple(%g)
}

ENTRY %main (a: f32[256]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  %f = f32[256]{0:T(256)S(1)} fusion(%a), kind=kLoop, calls=%fused
  %cs = (f32[256]{0:S(1)}, f32[256]{0}, u32[]) copy-start(%f)
  %cd = f32[256]{0} copy-done(%cs)
  %w = (f32[256]{0}) while(%t0), condition=%cond, body=%body
  ROOT %o = f32[256]{0} add(%cd, %cd)
}
"""
  # fusion f: reads a (1024); copy-start reads f (on chip: 0); copy-done writes 1024;
  # add: 2 x 1024 read + 1024 written; body: fusion f2 reads g (1024), writes on chip.
  assert hbm.hbm_traffic_bytes(text) == 1024 + 1024 + 3 * 1024 + 1024


def test_largest_fitting_bisects():
  for limit in (1, 7, 64, 100):
    for best in (0, 1, 3, 37, 64, 100):
      found, tried = mode.largest_fitting(lambda b, best=best: b <= best, limit, start=4)
      assert found == min(best, limit), (limit, best)
      assert len(tried) <= 2 * math.ceil(math.log2(limit + 1)) + 2


def test_resnet50_extraction_flops_match_4_1_gmacs(tmp_path):
  """The report's flops of one ResNet-50 image at 224 px: 2 x 4.1 GMACs within 5%.

  At 8 images per chip: at 1 per chip the TPU cost model counts padded tiles (+10%).
  """
  r = _run(tmp_path, **{"model.backbone": "resnet50",
                        "model.backbone_kwargs": ml_collections.ConfigDict(
                            {"bn_mode": "frozen_stats"}),
                        "extract.long_side": 224, "extract.batch_size": 32,
                        "compile.programs": ("extract",)})
  e = r["programs"][0]
  assert e["program"] == "extract_224x224" and e["batch_per_chip"] == 8
  assert abs(e["flops_per_item"] / (2 * 4.1e9) - 1) < 0.05, e["flops_per_item"]


def _vit_forward_macs(side, dim, depth, patch=14, mlp=4):
  """Multiply-adds of one image through a ViT's matmuls (patch embedding, qkv, the two
  attention products, projection, MLP), by hand."""
  patches = (side // patch) ** 2
  tokens = patches + 1
  block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim
  block += 2 * tokens * dim * mlp * dim
  return patches * patch * patch * 3 * dim + depth * block


def _vit_param_count(dim, depth, grid, mlp=4):
  """A DINOv2-layout ViT's parameters, counted by hand (timm's layout), + GeM's p."""
  block = (2 * 2 * dim + dim * 3 * dim + 3 * dim + dim * dim + dim + 2 * dim
           + dim * mlp * dim + mlp * dim + mlp * dim * dim + dim)
  return (14 * 14 * 3 * dim + dim) + (1 + grid ** 2) * dim + dim + depth * block + 2 * dim + 1


def test_tiny_vit_train_step_compiles_for_a_tpu_topology(tmp_path):
  """A tiny DINOv2-layout ViT (the vit_b14 trunk's code at width 32, depth 2) trains on
  v5e:2x2: it fits, its state is params + Adam's moments, its FLOPs are those of its
  matmuls (forward + backward ~ 3 x forward), data parallel with the mining gather.
  configs/vit_b14_gem.py's full step is benchmarks/pod_compile.py's vit_b14_v5e case."""
  dim, depth, grid = 32, 2, 4
  r = _run(tmp_path, **{"model.backbone": "vit_b14", "compile.programs": ("train",),
                        "model.backbone_kwargs": ml_collections.ConfigDict(
                            {"embed_dim": dim, "depth": depth, "num_heads": 2,
                             "pos_grid": grid})})
  (e,) = r["programs"]
  assert e["program"] == "train" and e["fits"] is True and e["batch_per_chip"] == 8
  c = get_config()
  c.model.backbone = "vit_b14"
  c.model.backbone_kwargs = {"embed_dim": dim, "depth": depth, "num_heads": 2, "pos_grid": grid}
  params = programs.abstract_variables(networks.build_network(c.model), 64)["params"]
  count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  assert count == _vit_param_count(dim, depth, grid)
  assert e["memory_breakdown_bytes"]["argument"] >= 3 * 4 * count
  # Layer norms, softmax, GELU and the update add a little at this width; padding to TPU
  # tiles can add more, never less.
  ratio = e["flops_per_item"] / (3 * 2 * _vit_forward_macs(64, dim, depth))
  assert 1.0 <= ratio <= 1.5, ratio
  assert "data" in e["collectives"]["all-reduce"]["axes"]
  assert e["collectives"]["all-gather"]["count"] >= 1


def _config_names():
  return sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                if f.endswith(".py") and f not in ("common.py", "__init__.py"))


def test_every_config_builds_and_traces_its_train_step_for_two_v5e_256_slices():
  """--mode=compile's programs exist for every config on 2 x v5e:16x16 (512 chips, a slice
  axis): all are built, the train step (and epoch mining's describe) and the search are
  traced with their shardings. The full compiles are benchmarks/pod_compile.py's."""
  import importlib  # pylint: disable=import-outside-toplevel
  from retrieval_jax.aot import topology  # pylint: disable=import-outside-toplevel
  devices = topology.topology_devices("v5e:16x16", 2)
  assert len(devices) == 512
  for name in _config_names():
    c = importlib.import_module(f"configs.{name}").get_config()
    c.compile.num_slices = 2
    config_checks.validate(c, "compile")
    mesh = topology.make_mesh(devices, c.mesh.shape, c.mesh.axes, 2)
    built = programs.build(c, mesh, tuple(c.compile.programs))
    names = [p.name for p in built]
    assert names[0] == "train" and names[-1] == "search", (name, names)
    assert any(n.startswith("extract") for n in names), (name, names)
    assert any(n.startswith("local") for n in names) == bool(c.model.local_head), name
    for p in built:
      if p.name in ("train", "mine_describe", "search"):
        p.fn.trace(*p.args)


def test_local_programs_take_the_pyramid_levels_that_keypoints_feed():
  """--mode=compile's DELG programs are the ones extraction runs: per bucket and scale, the
  shape and dtype of `delg_input.pyramid_level` (float32 resized levels, uint8 at scale 1)."""
  from configs import delg_demo  # pylint: disable=import-outside-toplevel
  from retrieval_jax import sharding  # pylint: disable=import-outside-toplevel
  from retrieval_jax.data import transforms  # pylint: disable=import-outside-toplevel
  from retrieval_jax.local import delg_input  # pylint: disable=import-outside-toplevel
  c = delg_demo.get_config()
  c.compile.extract_buckets = "all"
  mesh = sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  built = programs.local_programs(c, mesh)
  side = int(c.extract.local_long_side or c.extract.long_side)
  expected = []
  for h, w in transforms.square_buckets(side):
    for s in c.extract.local_scales:
      im, m = delg_input.pyramid_level(np.zeros((1, h, w, 3), np.uint8),
                                       np.ones((1, h, w), bool), float(s))
      expected.append((im.shape[1:], im.dtype, m.shape[1:]))
  got = [(p.args[1].shape[1:], np.dtype(p.args[1].dtype), p.args[2].shape[1:]) for p in built]
  assert got == expected
  assert {d for _, d, _ in got} == {np.dtype(np.uint8), np.dtype(np.float32)}
