"""How images become descriptors: one frozen `DescriptorSettings`, built once per network.

`build(config, model, variables, dataset)` reads `config.extract` / `config.eval` once and
resolves every derived value there (the input protocol's `exif_transpose="auto"` from the
dataset, the multi-scale exponent from the network, `extract.local_long_side=0`, the
`export.*` overrides); extraction, evaluation, re-ranking, export, describe, search and
the whitening store take the object and never read those config fields themselves, so
two consumers cannot describe the same image differently. `digest()` names the settings
(the whitening store keys its files by it and the weights' identity).
"""
import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from retrieval_jax import multiscale
from retrieval_jax import networks
from retrieval_jax.data import protocol as protocol_lib


@dataclasses.dataclass(frozen=True)
class LocalSettings:
  """DELG local features (`model.local_head`): the pyramid, top scores and NMS."""
  long_side: int
  scales: Tuple[float, ...]
  score_threshold: float
  max_features: int
  iou_threshold: float
  batch_size: int


@dataclasses.dataclass(frozen=True)
class DescriptorSettings:
  """Everything that decides an image's global descriptor (and its local features).

  Attributes:
    dataset: the described set's name ("" for a user's folder); it decided
      `protocol.exif_transpose` ("auto").
    long_side: images are resized so that their longer side is `long_side * scale`.
    batch_size: images per batch.
    scales: input scales; more than one gives a multi-scale descriptor.
    multiscale_combine: a `multiscale.COMBINES` name.
    multiscale_p: the late-fusion exponent (None: the mean, or early fusion).
    sgem_p: scale-GeM's p (`extract.sgem_p`) for the scale-GeM combinations, else None.
    protocol: the input rule (`data/protocol.py`).
    rotations: apply the set's per-image orientation fixes (Holidays).
    whitening: post-hoc whitening kind ("" none; `postprocess/whitening_store.py`).
    whitening_dim: its components kept (0 = all).
    local: the local-feature settings, None without a local head.
  """
  dataset: str
  long_side: int
  batch_size: int
  scales: Tuple[float, ...]
  multiscale_combine: str
  multiscale_p: Optional[float]
  protocol: protocol_lib.EvalProtocol
  rotations: bool = True
  whitening: str = ""
  whitening_dim: int = 0
  local: Optional[LocalSettings] = None
  sgem_p: Optional[float] = None

  @property
  def early_fusion(self) -> bool:
    return multiscale.COMBINES.get(self.multiscale_combine).fuses_maps

  def extract_kwargs(self) -> Dict[str, Any]:
    """The keyword arguments of `extract.extract_descriptors`."""
    scale_gem = multiscale.scale_gem_of(self.multiscale_combine, self.sgem_p)
    return dict(long_side=self.long_side, batch_size=self.batch_size, scales=self.scales,
                multiscale_p=self.multiscale_p, early_fusion=self.early_fusion,
                protocol=self.protocol,
                **({} if scale_gem is None else {"scale_gem": scale_gem}))

  def image_rotations(self, rotations: Optional[Mapping[str, int]],
                      images: Sequence[str]) -> Optional[List[int]]:
    """Per-image clockwise degrees of `images` from a set's {path: degrees}, or None."""
    if not self.rotations or not rotations:
      return None
    return [int(rotations.get(p, 0)) for p in images]

  def record(self) -> Dict[str, Any]:
    """A JSON-able dict of every field (`from_record` reads it back); `sgem_p` only when
    set, so the digests of other settings stay those of before scale-GeM."""
    out = dataclasses.asdict(self) | {"scales": list(self.scales)} | (
        {"local": dict(dataclasses.asdict(self.local), scales=list(self.local.scales))}
        if self.local is not None else {})
    if out["sgem_p"] is None:
      del out["sgem_p"]
    return out

  def digest(self) -> str:
    """A short hash of `record()`: equal digests, equal descriptors (for given weights)."""
    text = json.dumps(self.record(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def replace(self, **changes) -> "DescriptorSettings":
    return dataclasses.replace(self, **changes)


def from_record(record: Mapping[str, Any]) -> DescriptorSettings:
  """The settings a `record()` (or an older describe index's config.json) holds.

  Older indexes recorded only long_side, batch_size, scales, multiscale_p and protocol:
  their combination is "gem" when a p was recorded, else "mean" (they had no early fusion).
  """
  combine = record.get("multiscale_combine") or (
      "gem" if record.get("multiscale_p") is not None else "mean")
  local = record.get("local")
  return DescriptorSettings(
      dataset=str(record.get("dataset", "")), long_side=int(record["long_side"]),
      batch_size=int(record["batch_size"]),
      scales=tuple(float(s) for s in record["scales"]), multiscale_combine=combine,
      multiscale_p=record.get("multiscale_p"),
      protocol=protocol_lib.EvalProtocol(**record["protocol"]),
      rotations=bool(record.get("rotations", True)),
      whitening=str(record.get("whitening", "")),
      whitening_dim=int(record.get("whitening_dim", 0)),
      local=None if not local else LocalSettings(**dict(local, scales=tuple(local["scales"]))),
      sgem_p=None if record.get("sgem_p") is None else float(record["sgem_p"]))


def _local(extract_config, has_local_head: bool) -> Optional[LocalSettings]:
  if not has_local_head:
    return None
  e = extract_config
  return LocalSettings(long_side=int(e.local_long_side or e.long_side),  # 0: long_side
                       scales=tuple(float(s) for s in e.local_scales),
                       score_threshold=float(e.local_score_threshold),
                       max_features=int(e.local_max_features),
                       iou_threshold=float(e.local_iou), batch_size=int(e.batch_size))


def build(config, model, variables, dataset: str, *,
          overrides: Optional[Mapping[str, Any]] = None) -> DescriptorSettings:
  """The settings of `config` for `model` (with `variables`) describing `dataset`.

  Args:
    config: the experiment config (`extract.*`, `eval.whitening*`).
    model: the network (its `pooling` decides the multi-scale exponent; a local head adds
      the local settings).
    variables: its variables (the learned GeM p).
    dataset: the described set's name ("" for a user's folder: EXIF orientation applied).
    overrides: fields of `config.extract` replaced where set (not "", 0 or ()): the
      `config.export` section (long_side, scales, multiscale_combine).
  """
  e = config.extract
  given = {k: v for k, v in dict(overrides or {}).items() if v not in ("", 0, (), None)}
  combine = given.get("multiscale_combine", e.multiscale_combine)
  return DescriptorSettings(
      dataset=dataset, long_side=int(given.get("long_side", e.long_side)),
      batch_size=int(e.batch_size),
      scales=tuple(float(s) for s in given.get("scales", e.scales)),
      multiscale_combine=combine,
      multiscale_p=multiscale.multiscale_p_from(variables, combine,
                                                getattr(model, "pooling", None)),
      protocol=protocol_lib.from_switches(e, dataset),
      whitening=str(config.eval.whitening or ""),
      whitening_dim=int(config.eval.whitening_dim or 0),
      local=_local(e, networks.has_local_head(model)),
      sgem_p=(float(e.sgem_p) if multiscale.COMBINES.get(combine).scale_gem is not None
              else None))
