"""launch/colab_demo.ipynb runs headless (nbclient) on CPU, so it cannot rot.

The settings cell (tagged "parameters") is pointed at this checkout with INSTALL = False (no
network), and at a short setting: the tiny ResNet-18 config of tests/multiprocess_util.py, two
training steps, evaluation on the demo set at 48 px. Every other cell runs as a Colab user
would run it: the accelerator probe, training, the restore in a fresh process, the picture.
"""
import base64
import os

import nbformat
from nbclient import NotebookClient
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab_demo.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _parameters_cell(nb):
  (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  return cell


def _text(cell):
  return "".join(o.get("text", "") for o in cell.get("outputs", []))


def test_notebook_settings_are_in_one_visible_cell():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  source = _parameters_cell(nb).source
  assert "REPO = " in source and "YOUR_ORG" in source
  text = "\n".join(c.source for c in nb.cells)
  assert "|| true" not in text and "2>/dev/null" not in text  # errors are never hidden


def test_notebook_refuses_the_placeholder_url(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells = nb.cells[:3]  # settings + install, as shipped
  client = NotebookClient(nb, timeout=60, kernel_name="python3", resources={
      "metadata": {"path": str(tmp_path)}})
  with pytest.raises(Exception, match="Set REPO"):
    client.execute()


def test_notebook_runs_headless_on_cpu(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "demo"
  _parameters_cell(nb).source = "\n".join([
      f"REPO = {REPO!r}",
      "REF = 'main'",
      "INSTALL = False",
      "CONFIG = 'tests/multiprocess_util.py:in_batch'",
      f"WORKDIR = {str(workdir)!r}",
      "EXTRA = ['--config.train.num_steps=2', '--config.eval.dataset=demo',",
      "         '--config.eval.pictures=2', '--config.extract.long_side=48']",
  ])
  client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={
      "metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = {i: _text(c) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
  joined = "\n".join(outputs.values())
  assert "CPU only" in joined  # the accelerator probe said what it found
  assert "step 2/2" in joined  # training ran
  assert '"checkpoint_step": 2' in joined  # the fresh process restored the final checkpoint
  assert os.path.isdir(workdir / "checkpoints" / "2")
  images = [o for c in nb.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) == 1
  assert base64.b64decode(images[0]["data"]["image/png"]).startswith(PNG_MAGIC)
