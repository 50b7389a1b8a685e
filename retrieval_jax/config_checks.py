"""Config values checked before any compute, each error naming its key.

`validate(config, mode)` runs at the start of every mode. ml_collections checks the key
names and the scalar types of command-line overrides, not the values: `log_every=0` used
to end in a ZeroDivisionError after the model was built, `crop_scale=oops` became
`('oops',)`, `num_steps=0` exited 0 silently, and a backbone without the demo's
`frozen_blocks` raised a raw TypeError. Every problem found is listed in one
`ConfigError` (a ValueError), one line per key, with what to do.
"""
import dataclasses
import numbers
from typing import Any, Callable, List, Sequence

from retrieval_jax import errors
from retrieval_jax import export as export_lib
from retrieval_jax import losses
from retrieval_jax import multiscale
from retrieval_jax import networks
from retrieval_jax import storage
from retrieval_jax.data import datasets
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import protocol
from retrieval_jax.evaluation import d2r
from retrieval_jax.evaluation import pipeline
from retrieval_jax.evaluation import rerankers
from retrieval_jax.local import aggregation
from retrieval_jax.local import heads
from retrieval_jax.local import matching
from retrieval_jax.models import backbones
from retrieval_jax.models import pooling
from retrieval_jax.postprocess import clustering
from retrieval_jax.postprocess import whitening

# Tuple fields whose elements must be numbers:
# key -> (length or None, element check, rule, an example for the message).
_NUMERIC_TUPLES = {
    "data.crop_scale": (2, lambda v: 0 < v <= 1, "two area fractions in (0, 1]",
                        "(0.5, 1.0)"),
    "extract.scales": (None, lambda v: v > 0, "positive scale factors",
                       "(1.0, 0.7071, 0.5)"),
    "mesh.shape": (None, lambda v: v == -1 or (v > 0 and float(v).is_integer()),
                   "positive integers or -1", "(-1,)"),
}
_POSITIVE = ("train.checkpoint_every", "train.log_every", "train.keep_checkpoints",
             "data.image_size", "data.num_threads", "extract.long_side", "extract.batch_size",
             "optim.accumulate_steps", "serve.max_bytes", "search.k")
_NON_NEGATIVE = ("train.num_steps", "train.num_epochs", "train.eval_every",
                 "train.stop_after", "eval.pictures", "eval.qe_k", "eval.dba_k",
                 "eval.whitening_dim", "model.whitening_dim", "data.batch_size",
                 "extract.cpu_devices")
_DTYPES = ("float32", "bfloat16", "float16")
_MODE_NEEDS_TRAINING = ("train",)


class ConfigError(errors.UserError, ValueError):
  """Invalid config values; the message has one line per key."""


def _get(config: Any, key: str, default: Any = None) -> Any:
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return default
  return node


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _walk(node: Any, prefix: str = ""):
  """(dotted key, value) of every leaf of a ConfigDict / dict."""
  items = node.items() if hasattr(node, "items") else ()
  for k, v in items:
    key = f"{prefix}{k}"
    if hasattr(v, "items") and not isinstance(v, (str, bytes)):
      yield from _walk(v, key + ".")
    else:
      yield key, v


def _module_options(make: Callable[..., Any]) -> List[str]:
  """The dataclass fields a flax module factory accepts (its keyword options)."""
  try:
    module = make()
  except TypeError:
    return []
  return sorted(f.name for f in dataclasses.fields(module)
                if f.name not in ("parent", "name") and f.init)


def _check_kwargs(errors: List[str], key: str, what: str, make: Callable[..., Any],
                  kwargs: Any) -> None:
  kwargs = dict(kwargs or {})
  if not kwargs:
    return
  options = _module_options(make)
  unknown = sorted(set(kwargs) - set(options)) if options else []
  if unknown:
    errors.append(f"config.{key}: {', '.join(unknown)} not taken by {what}; its options "
                  f"are {', '.join(options)}. Remove them from the config (a config file "
                  "written for another backbone sets them)")
    return
  try:
    make(**kwargs)
  except (TypeError, ValueError) as e:
    errors.append(f"config.{key}: {what} rejects {kwargs}: {e}")


def _check_name(errors: List[str], key: str, value: Any, known: Sequence[str],
                allow_empty: bool = False) -> None:
  if allow_empty and value in ("", None):
    return
  if value not in known:
    errors.append(f"config.{key}={value!r} is not one of {sorted(known)}")


def find_problems(config: Any, mode: str = "train") -> List[str]:
  """All problems of `config` for `mode` ("train", "extract", "evaluate", ...), one per line."""
  errors: List[str] = []
  for key in _POSITIVE:
    v = _get(config, key)
    if v is not None and (not _is_number(v) or v <= 0):
      errors.append(f"config.{key}={v!r} must be a positive number")
  for key in _NON_NEGATIVE:
    v = _get(config, key)
    if v is not None and (not _is_number(v) or v < 0):
      errors.append(f"config.{key}={v!r} must be >= 0")
  for key, (length, ok, rule, example) in _NUMERIC_TUPLES.items():
    v = _get(config, key)
    if v is None:
      continue
    if (not isinstance(v, (tuple, list)) or not v or not all(_is_number(x) for x in v)
        or (length is not None and len(v) != length) or not all(ok(x) for x in v)):
      errors.append(f"config.{key}={v!r} must be a tuple of {rule}, e.g. "
                    f"--config.{key}='{example}'")
  for key, v in _walk(config):
    if key.split(".")[-1] == "dtype" and v not in _DTYPES:
      errors.append(f"config.{key}={v!r} is not a dtype name; use one of {list(_DTYPES)}")

  # Names, checked before the model or any data loads.
  backbone = _get(config, "model.backbone")
  if backbone is not None:
    if backbone not in backbones.backbone_names():
      errors.append(f"config.model.backbone={backbone!r} is not one of "
                    f"{backbones.backbone_names()}")
    else:
      spec = backbones.get_backbone(backbone)
      _check_kwargs(errors, "model.backbone_kwargs", f"backbone {backbone!r}", spec.make,
                    _get(config, "model.backbone_kwargs"))
  pool = _get(config, "model.pooling")
  if pool is not None:
    if pool not in pooling.POOLINGS:
      errors.append(f"config.model.pooling={pool!r} is not one of {pooling.POOLINGS.names()}")
    else:
      _check_kwargs(errors, "model.pooling_kwargs", f"pooling {pool!r}",
                    pooling.POOLINGS.get(pool), _get(config, "model.pooling_kwargs"))
  loss = _get(config, "loss.name")
  if loss is not None and mode in _MODE_NEEDS_TRAINING:
    _check_name(errors, "loss.name", loss, losses.LOSSES.names())
  known_sets = datasets.names()
  if mode in _MODE_NEEDS_TRAINING:
    _check_name(errors, "data.name", _get(config, "data.name"), known_sets)
  _check_name(errors, "eval.dataset", _get(config, "eval.dataset"), known_sets,
              allow_empty=True)
  _check_name(errors, "eval.whitening", _get(config, "eval.whitening"),
              ("",) + tuple(whitening.KINDS), allow_empty=True)
  if _get(config, "eval.whitening"):
    _check_name(errors, "eval.whitening_dataset", _get(config, "eval.whitening_dataset"),
                known_sets, allow_empty=True)
  _check_name(errors, "data.sampler", _get(config, "data.sampler"), grain_pipeline.SAMPLERS,
              allow_empty=True)
  _check_name(errors, "data.train_resize", _get(config, "data.train_resize"),
              grain_pipeline.TRAIN_RESIZES, allow_empty=True)
  extract = _get(config, "extract")
  if extract is not None:
    try:
      protocol.from_switches(extract)
    except ValueError as e:
      errors.append(f"config.{e}")
  _check_combinations(errors, config, mode)
  _check_name(errors, "loss.mining_scope", _get(config, "loss.mining_scope", "global"),
              ("global", "slice", "chip"))
  if mode == "compile":
    errors.extend(_compile_problems(config))
  errors.extend(superglobal_problems(config, mode))
  errors.extend(d2r_problems(config, mode))
  errors.extend(vit_problems(config))
  fraction = _get(config, "data.heldout_fraction")
  if fraction is not None and (not _is_number(fraction) or not 0 <= fraction < 1):
    errors.append(f"config.data.heldout_fraction={fraction!r} must be in [0, 1)")
  uses_folder = ((mode in _MODE_NEEDS_TRAINING and _get(config, "data.name") == "folder")
                 or (mode in ("train", "evaluate", "extract")
                     and _get(config, "eval.dataset") == "folder"
                     and not _get(config, "eval.root")))
  if uses_folder and not _get(config, "data.root") and not _get(config, "data.list"):
    errors.append("config.data.name='folder' needs your photos: --config.data.root=<folder, one "
                  "sub-folder per landmark> or --config.data.list=<file of path<TAB>label "
                  "lines>")
  port = _get(config, "serve.port")
  if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                           or not 0 <= port <= 65535):
    errors.append(f"config.serve.port={port!r} must be a port number in [0, 65535] (0: any "
                  "free port)")
  if mode == "serve" and not _get(config, "serve.host"):
    errors.append("config.serve.host is empty: give the address to listen on, e.g. 127.0.0.1")
  if mode in _MODE_NEEDS_TRAINING and _get(config, "train.num_steps") == 0 and not _get(
      config, "train.num_epochs"):
    errors.append("config.train.num_steps=0: there is nothing to train; give a number of "
                  "steps, or run --mode=evaluate to evaluate the pretrained network")
  return errors


def _check_tuple(errors: List[str], key: str, value: Any, ok: Callable[[Any], bool],
                 rule: str) -> None:
  if value is None:
    return
  if (not isinstance(value, (tuple, list)) or not value
      or not all(_is_number(x) and ok(x) for x in value)):
    errors.append(f"config.{key}={value!r} must be a tuple of {rule}")


def _check_export_serving(errors: List[str], config: Any) -> None:
  """export.serving_default (retrieval_jax/export.py) and export.local_max_scale."""
  serving = _get(config, "export.serving_default")
  if serving is not None:
    _check_name(errors, "export.serving_default", serving, export_lib.SERVING_DEFAULTS)
    if serving == "delg" and not _get(config, "model.local_head"):
      errors.append("config.export.serving_default='delg' is the reference DELG signature "
                    "(local and global features): it needs --config.model.local_head=delg; "
                    "use 'describe' (or 'auto') for a global-only network")
  max_scale = _get(config, "export.local_max_scale")
  if max_scale is not None and (not _is_number(max_scale) or max_scale < 0):
    errors.append(f"config.export.local_max_scale={max_scale!r} must be >= 0 (0: the largest "
                  "of extract.local_scales)")


def _check_combinations(errors: List[str], config: Any, mode: str) -> None:
  """Values that are valid alone but not together, and the local-feature fields."""
  combine = _get(config, "extract.multiscale_combine")
  if combine is not None:
    _check_name(errors, "extract.multiscale_combine", combine, multiscale.COMBINES.names())
  export_combine = _get(config, "export.multiscale_combine")
  if mode == "export" and export_combine is not None:
    effective = export_combine or combine
    if effective in multiscale.COMBINES and multiscale.COMBINES.get(effective).fuses_maps:
      errors.append(f"config.export.multiscale_combine: {effective!r} (from "
                    f"{'export' if export_combine else 'extract'}.multiscale_combine) fuses "
                    "feature maps, which the exported function does not; set "
                    "--config.export.multiscale_combine=gem (or mean)")
  _check_export_serving(errors, config)
  init = _get(config, "model.netvlad_init")
  if init is not None:
    _check_name(errors, "model.netvlad_init", init, clustering.NETVLAD_INITS)
    pool = _get(config, "model.pooling")
    if init == "kmeans" and pool not in clustering.NETVLAD_POOLINGS:
      errors.append(f"config.model.netvlad_init='kmeans' learns NetVLAD centres, but "
                    f"model.pooling={pool!r}; use a pooling in {list(clustering.NETVLAD_POOLINGS)} "
                    "or --config.model.netvlad_init=''")
  local_head = _get(config, "model.local_head")
  if local_head is not None:
    _check_name(errors, "model.local_head", local_head, networks.LOCAL_HEADS)
  if local_head:
    _check_name(errors, "model.local_classifier", _get(config, "model.local_classifier"),
                heads.ATTENTION_CLASSIFIERS)
    for key in ("model.local_dim", "model.local_num_classes"):
      v = _get(config, key)
      if v is not None and (not _is_number(v) or v < 0):
        errors.append(f"config.{key}={v!r} must be >= 0")
    for key in ("model.local_attention_hidden", "extract.local_max_features"):
      v = _get(config, key)
      if v is not None and (not _is_number(v) or v <= 0):
        errors.append(f"config.{key}={v!r} must be a positive number")
    v = _get(config, "extract.local_long_side")
    if v is not None and (not _is_number(v) or v < 0):
      errors.append(f"config.extract.local_long_side={v!r} must be >= 0 (0: extract.long_side)")
    v = _get(config, "extract.local_iou")
    if v is not None and (not _is_number(v) or not 0 < v <= 1):
      errors.append(f"config.extract.local_iou={v!r} must be in (0, 1] (1: no NMS)")
    _check_tuple(errors, "extract.local_scales", _get(config, "extract.local_scales"),
                 lambda x: x > 0, "positive scale factors")
  rerank = _get(config, "eval.rerank")
  if rerank:
    _check_name(errors, "eval.rerank", rerank, rerankers.RERANKERS.names())
    if rerank in ("local", "asmk", "d2r") and not local_head:
      errors.append(f"config.eval.rerank={rerank!r} re-ranks with local features: set "
                    "--config.model.local_head=delg (a network with a local head)")
    if rerank == "local":
      _check_name(errors, "eval.rerank_matcher", _get(config, "eval.rerank_matcher"),
                  matching.MATCHERS)
      _check_name(errors, "eval.rerank_model", _get(config, "eval.rerank_model"),
                  matching.MODELS)
      _check_name(errors, "eval.rerank_backend", _get(config, "eval.rerank_backend"),
                  matching.BACKENDS)
      for key in ("eval.rerank_threads", "eval.rerank_max_trials", "eval.rerank_distance",
                  "eval.rerank_residual"):
        v = _get(config, key)
        if v is not None and (not _is_number(v) or v <= 0):
          errors.append(f"config.{key}={v!r} must be a positive number")
      v = _get(config, "eval.rerank_min_inliers")
      if v is not None and (not _is_number(v) or v < 0):
        errors.append(f"config.eval.rerank_min_inliers={v!r} must be >= 0 (0: the "
                      "reference's raw (inliers, global score) order)")
  skip = _get(config, "train.eval_skip")
  if skip:
    unknown = sorted(set(skip) - set(pipeline.STAGES))
    if unknown:
      errors.append(f"config.train.eval_skip: {unknown} are not evaluation stages; they "
                    f"are {list(pipeline.STAGES)}")


_COMPILE_PROGRAMS = ("train", "extract", "local", "search")


def _compile_problems(config: Any) -> List[str]:
  """The `compile.*` fields of --mode=compile (retrieval_jax/aot/)."""
  errors = []
  topology = _get(config, "compile.topology", "")
  if not isinstance(topology, str) or ":" not in topology:
    errors.append(f"config.compile.topology={topology!r} must be <generation>:<chips>, e.g. "
                  "v5e:16x16, v4:8x8x8, v5p:8x8x8")
  for key in ("compile.num_slices", "compile.max_batch_limit", "compile.search_db_size",
              "compile.search_queries", "compile.search_query_batch", "compile.search_k"):
    v = _get(config, key)
    if v is not None and (not _is_number(v) or v < 1):
      errors.append(f"config.{key}={v!r} must be a positive integer")
  for key in ("compile.batch_per_chip", "compile.num_classes", "compile.steps_per_epoch"):
    v = _get(config, key)
    if v is not None and (not _is_number(v) or v < 0):
      errors.append(f"config.{key}={v!r} must be >= 0 (0: derived)")
  programs = _get(config, "compile.programs", ())
  if not programs or any(p not in _COMPILE_PROGRAMS for p in programs):
    errors.append(f"config.compile.programs={programs!r} must name some of {_COMPILE_PROGRAMS}")
  _check_name(errors, "compile.extract_buckets", _get(config, "compile.extract_buckets"),
              ("all", "largest"))
  _check_name(errors, "compile.search_dtype", _get(config, "compile.search_dtype"),
              ("float32", "bfloat16"))
  axes = tuple(_get(config, "mesh.axes", ()) or ())
  if (_get(config, "loss.mining_scope") == "slice" and (_get(config, "compile.num_slices") or 1)
      < 2 and axes[:1] != ("slice",)):
    errors.append("config.loss.mining_scope='slice' mines within each TPU slice: compile for "
                  "--config.compile.num_slices>=2 (or a mesh.axes starting with 'slice')")
  return errors


def d2r_problems(config: Any, mode: str) -> List[str]:
  """Detect-to-Retrieve's fields: eval.d2r_* (eval.rerank=d2r) and detect.* (--mode=detect)."""
  errors: List[str] = []
  if mode == "detect":
    model = _get(config, "detect.model")
    if not model:
      errors.append("config.detect.model is empty: --mode=detect needs a detector TF "
                    "SavedModel folder, --config.detect.model=<path>")
    elif not storage.exists(storage.join(str(model), "saved_model.pb")):
      errors.append(f"config.detect.model={model!r} holds no saved_model.pb (a TF "
                    "SavedModel folder)")
    if not _get(config, "eval.dataset"):
      errors.append("--mode=detect detects boxes in the test set: set "
                    "--config.eval.dataset=<name>")
  v = _get(config, "detect.score_threshold")
  if v is not None and not _is_number(v):
    errors.append(f"config.detect.score_threshold={v!r} must be a number")
  if _get(config, "eval.rerank") != "d2r":
    return errors
  _check_name(errors, "eval.d2r_aggregation", _get(config, "eval.d2r_aggregation"),
              aggregation.TYPES)
  _check_name(errors, "eval.d2r_regions", _get(config, "eval.d2r_regions"), d2r.REGIONS)
  size = _get(config, "eval.d2r_codebook_size")
  for key in ("eval.d2r_codebook_size", "eval.d2r_num_assignments", "eval.d2r_train_images",
              "eval.d2r_kmeans_iterations"):
    v = _get(config, key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
      errors.append(f"config.{key}={v!r} must be a positive integer")
  m = _get(config, "eval.d2r_num_assignments")
  if isinstance(m, int) and isinstance(size, int) and m > size:
    errors.append(f"config.eval.d2r_num_assignments={m} exceeds eval.d2r_codebook_size={size}")
  for key in ("eval.d2r_alpha", "eval.d2r_tau"):
    v = _get(config, key)
    if v is not None and not _is_number(v):
      errors.append(f"config.{key}={v!r} must be a number")
  v = _get(config, "eval.d2r_top")
  if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v == 0 or v < -1):
    errors.append(f"config.eval.d2r_top={v!r} must be -1 (rank the whole database) or a "
                  "positive head length")
  return errors


def superglobal_problems(config: Any, mode: str) -> List[str]:
  """SuperGlobal's fields (model.relup_alpha / regional_gem*, extract.multiscale_combine
  sgem*, eval.rerank=superglobal and eval.superglobal_*)."""
  errors: List[str] = []
  if _get(config, "eval.rerank") == "superglobal":
    m, k = _get(config, "eval.superglobal_m"), _get(config, "eval.superglobal_k")
    beta = _get(config, "eval.superglobal_beta")
    if not isinstance(m, int) or m < 2:
      errors.append(f"config.eval.superglobal_m={m!r} must be an integer >= 2 (paper: 400)")
    if not isinstance(k, int) or k < 1 or (isinstance(m, int) and k >= m):
      errors.append(f"config.eval.superglobal_k={k!r} must be an integer in [1, "
                    "eval.superglobal_m) (paper: 9)")
    if not _is_number(beta) or beta < 0:
      errors.append(f"config.eval.superglobal_beta={beta!r} must be >= 0 (paper: 0.15)")
  alpha = _get(config, "model.relup_alpha")
  if alpha is not None and (not _is_number(alpha) or alpha < 0):
    errors.append(f"config.model.relup_alpha={alpha!r} must be >= 0 (0: off; SuperGlobal: "
                  "0.014)")
  if _get(config, "model.regional_gem"):
    size, p = _get(config, "model.regional_gem_size"), _get(config, "model.regional_gem_p")
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
      errors.append(f"config.model.regional_gem_size={size!r} must be an odd positive "
                    "integer (SuperGlobal: 5)")
    if not _is_number(p) or p <= 0:
      errors.append(f"config.model.regional_gem_p={p!r} must be > 0 (SuperGlobal: 2.5)")
  combine = _get(config, "extract.multiscale_combine")
  if mode == "export" and _get(config, "export.multiscale_combine"):
    combine = _get(config, "export.multiscale_combine")
  if combine in multiscale.COMBINES and multiscale.COMBINES.get(combine).scale_gem is not None:
    if mode == "export":
      errors.append(f"config.export.multiscale_combine: {combine!r} (scale-GeM) is not in "
                    "the exported function (it combines per-scale descriptors as gem / "
                    "mean only); set --config.export.multiscale_combine=gem (or mean)")
    if _get(config, "extract.multiscale_resize", "interpolate") != "interpolate":
      errors.append("config.extract.multiscale_combine=sgem* combines a batch's scales on "
                    "the device: set --config.extract.multiscale_resize=interpolate")
    sgem_p = _get(config, "extract.sgem_p")
    if not _is_number(sgem_p) or sgem_p <= 0:
      errors.append(f"config.extract.sgem_p={sgem_p!r} must be > 0 (SuperGlobal: 10)")
  return errors


def vit_problems(config: Any) -> List[str]:
  """The ViT trunks' class-token poolings need a ViT and per-scale descriptors."""
  errors: List[str] = []
  backbone, pool = _get(config, "model.backbone", ""), _get(config, "model.pooling", "")
  is_vit = str(backbone).startswith("vit_")
  if pool in pooling.TOKEN_POOLINGS:
    if not is_vit:
      errors.append(f"config.model.pooling={pool!r} pools a ViT's class token; "
                    f"model.backbone={backbone!r} has none: use gem (or a vit_* backbone)")
    if _get(config, "extract.multiscale_combine") == "early_fusion":
      errors.append(f"config.extract.multiscale_combine=early_fusion fuses feature maps; "
                    f"model.pooling={pool!r} needs the class token: use gem or mean")
  if is_vit and _get(config, "model.multi_layer"):
    errors.append("config.model.multi_layer=True concatenates two CNN stages; a ViT trunk has "
                  "one token map: set it to False")
  return errors


def validate(config: Any, mode: str = "train") -> None:
  """Raises ConfigError listing every invalid value of `config` for `mode`."""
  errors = find_problems(config, mode)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors) if len(errors) > 1
                      else errors[0])
