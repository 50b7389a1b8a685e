"""torchvision and timm on the CPU-only torch of the test requirements, as parity references.

PyPI's torchvision wheel is built against CUDA torch; next to the CPU torch (`torch==2.13.0+cpu`)
its C extension (NMS, RoI ops) fails to load, and `import torchvision` then stops at the
`register_fake("torchvision::nms")` of its meta registrations. The models we compare against
(torchvision.models, and timm, which imports torchvision) need none of those ops, so their two
schemas are declared here first. Where the extension does load, nothing is declared.

`import torchvision` also imports `torch._dynamo`, which probes for `triton` (a GPU kernel
compiler that the CUDA wheels pull in); importing triton after TensorFlow segfaults the process
(a test worker that ran test_export first, for instance), and CPU models never need it, so
it is marked absent before torchvision is imported.
"""
import sys

_LIBRARY = None  # kept alive: a torch.library.Library's definitions die with the object


def _declare_missing_ops():
  global _LIBRARY
  import torch  # pylint: disable=g-import-not-at-top
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  _LIBRARY = torch.library.Library("torchvision", "DEF")
  _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def torchvision():
  """The torchvision module (models only; its C ops may be absent)."""
  sys.modules.setdefault("triton", None)  # `import triton` then raises ImportError
  try:
    import torchvision as tv  # pylint: disable=g-import-not-at-top
  except RuntimeError as e:
    if "torchvision::" not in str(e) or _LIBRARY is not None:
      raise
    _declare_missing_ops()
    import torchvision as tv  # pylint: disable=g-import-not-at-top
  return tv


def timm():
  """The timm module, importable once torchvision is."""
  torchvision()
  import timm as timm_module  # pylint: disable=g-import-not-at-top
  return timm_module
