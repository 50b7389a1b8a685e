"""What several modes share: the restored network, its tag, the printed summary."""
from typing import Any, Dict, Optional, Tuple

from absl import logging
import numpy as np

from retrieval_jax import descriptor_settings
from retrieval_jax import restore
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import storage
from retrieval_jax.evaluation import pipeline

Summary = Dict[str, Any]
# The result label of a network evaluated without a checkpoint of this workdir.
OFF_THE_SHELF = "off-the-shelf (pretrained weights, no checkpoint)"


def network(config, workdir: str) -> Tuple[restore.Restored, Any]:
  """(restored network, mesh): the latest checkpoint, else `model.pretrained` (said in the
  log)."""
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
  net = restore.restore_model(config, workdir, mesh)
  if net.source == restore.PRETRAINED:
    logging.warning("no checkpoint in %s: using the pretrained weights %s as they are",
                    workdir, config.model.pretrained)
  return net, mesh


def tag(net: restore.Restored) -> str:
  """"pretrained" for off-the-shelf weights, else "step<N>"."""
  return "pretrained" if net.source == restore.PRETRAINED else f"step{net.step}"


def label(net: restore.Restored) -> str:
  """The summary's key of an evaluation of `net`: "after", or the off-the-shelf label."""
  return OFF_THE_SHELF if net.source == restore.PRETRAINED else "after"


def summary(workdir: str, results: Dict[str, Any], step: Optional[int] = None) -> Summary:
  """Before/after numbers side by side; the 'before' comes from the training run's file."""
  out = {}
  for k, r in pipeline.with_saved_before(workdir, results).items():
    if r:
      out[k] = {m: float(v) for m, v in r.items() if isinstance(v, (int, float, np.floating))}
      for line in r.get("lines", []):
        print(f"[{k}] {line}")
  if step is not None:
    out["checkpoint_step"] = int(step)
  return out


def output_dir(value: str, workdir: str, name: str) -> str:
  """A mode's output folder: `value` (`export.dir`, `describe.out`, `search.out`,
  `search.index`), or `<workdir>/<name>` where the config leaves it "" (the default)."""
  return storage.resolve(value or storage.join(workdir, name))


def settings_for_folders(config, net, overrides=None) -> descriptor_settings.DescriptorSettings:
  """The descriptor settings of a user's images (dataset "": `exif_transpose="auto"`
  applies the EXIF orientation)."""
  return descriptor_settings.build(config, net.model, net.variables, "", overrides=overrides)
