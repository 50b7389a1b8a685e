"""The programs a run executes, as jitted functions with abstract (shape-only) arguments.

Each builder returns `Program`s whose `fn.lower(*args)` is exactly what the run compiles:
the project's own train step (`train/step.py`, state as `train/state.py` builds it, donated),
the extraction functions of `extract.py` at the config's bucket shapes and scales, DELG's
local-feature selection (`local/keypoints.py`) and the sharded exact search (`knn.py`).
Nothing is materialised: variables and optimiser state come from `jax.eval_shape`, so a
ResNet-101 never exists in host memory. What only the data knows comes from `compile.*`.
"""
import dataclasses
import math
from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import config_checks
from retrieval_jax import extract as extract_lib
from retrieval_jax import losses
from retrieval_jax import networks
from retrieval_jax import knn as search_lib
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.data import protocol as protocol_lib
from retrieval_jax.data import transforms
from retrieval_jax.local import delg_input
from retrieval_jax.local import keypoints
from retrieval_jax.models import retrieval_net
from retrieval_jax.train import optim
from retrieval_jax.train import state as state_lib
from retrieval_jax.train import step as step_lib

# Class counts of the training sets' published versions (margin heads need them).
PUBLISHED_CLASSES = {"gldv2": 81313}  # GLDv2-clean train (Weyand et al., CVPR 2020)
# Training (query, positive) pairs of the published sets (epoch mining's steps per epoch).
PUBLISHED_PAIRS = {"retrieval-sfm-120k": 91642}


@dataclasses.dataclass
class Program:
  """One compiled function: `fn.lower(*args)`; `items` images (or queries) per call."""
  name: str
  fn: Any
  args: Tuple[Any, ...]
  items: int
  unit: str = "images"
  calls: int = 1          # calls per batch of `items` (search: database blocks)
  shapes: str = ""
  batch_per_chip: int = 0
  notes: List[str] = dataclasses.field(default_factory=list)


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype, sharding=sharding)


def _abstract(tree, sharding):
  return jax.tree_util.tree_map(lambda x: _sds(x.shape, x.dtype, sharding), tree)


def _round_up(n: int, k: int) -> int:
  return -(-int(n) // k) * k


def abstract_variables(model, image_size: int, seed: int = 0):
  """{"params", "batch_stats"} of `model` as shapes (init traced, never run)."""
  variables = dict(jax.eval_shape(model.init, jax.random.key(seed),
                                  retrieval_net.dummy_images(image_size)))
  variables.setdefault("batch_stats", {})
  return variables


def descriptor_dim(model, variables, image_size: int) -> int:
  out = jax.eval_shape(lambda v: model.apply(v, retrieval_net.dummy_images(image_size)),
                       variables)
  return int(out["descriptor"].shape[-1])


def num_classes(config) -> int:
  """Margin-head classes: compile.num_classes, else the training set's published count."""
  if int(config.compile.num_classes):
    return int(config.compile.num_classes)
  return PUBLISHED_CLASSES.get(config.data.name, 0)


def _train_lengths(config) -> Tuple[Optional[int], int]:
  """(updates per epoch for the "exp" schedule or None, total updates), as training derives."""
  accumulate = int(config.optim.accumulate_steps)
  if config.train.mining != "epoch":
    return None, max(1, int(config.train.num_steps) // accumulate)
  steps = int(config.compile.steps_per_epoch)
  if not steps:
    pairs = PUBLISHED_PAIRS.get(config.data.name, int(config.data.query_size))
    steps = max(1, min(int(config.data.query_size), pairs) // int(config.data.tuples_per_batch))
  epochs = int(config.train.num_epochs)
  total = epochs * steps if epochs else int(config.train.num_steps)
  return max(1, steps // accumulate), max(1, total // accumulate)


def train_batch_per_chip(config, mesh) -> Tuple[int, List[str]]:
  """Per-chip train batch (images, or tuples in epoch mining) and notes on how it was set."""
  n = sharding_lib.data_parallelism(mesh)
  if int(config.compile.batch_per_chip):
    return int(config.compile.batch_per_chip), []
  d = config.data
  if config.train.mining == "epoch":
    glob, what = int(d.tuples_per_batch), "tuples"
  elif d.sampler == "shuffle" and int(d.batch_size):
    glob, what = int(d.batch_size), "images"
  else:
    glob, what = int(d.classes_per_batch) * int(d.images_per_class), "images"
  per = max(1, -(-glob // n))
  notes = []
  if glob % n:
    notes.append(f"the config's global batch of {glob} {what} does not fill {n} chips: "
                 f"compiled at {per * n} ({per} per chip"
                 + ("; training pads with zero-weight tuples)" if what == "tuples" else ")"))
  return per, notes


def train_program(config, mesh, batch_per_chip: Optional[int] = None) -> Program:
  """The training step at `batch_per_chip` (None: the config's batch), state donated."""
  model = networks.build_network(config.model)
  size = int(config.data.image_size)
  variables = abstract_variables(model, size, config.seed)
  margin = losses.get_loss(config.loss.name).family == "margin_softmax"
  if margin and num_classes(config) < 2:
    raise config_checks.ConfigError(
        f"loss {config.loss.name!r} trains a head over the classes of {config.data.name!r}, "
        "whose published count is not known here: set --config.compile.num_classes")
  family_head = state_lib.make_head(config.loss, num_classes(config))
  head_params = {}
  if family_head is not None:
    dim = descriptor_dim(model, variables, size)
    head_params = jax.eval_shape(family_head.init, jax.random.key(1),
                                 jnp.zeros((1, dim), jnp.float32))["params"]
  state = state_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                               params=variables["params"], batch_stats=variables["batch_stats"],
                               opt_state=None, head=head_params)
  per_epoch, total = _train_lengths(config)
  bn_mode = config.model.backbone_kwargs.get("bn_mode", "frozen_stats")
  tx = optim.make_optimizer(config.optim, state.trainable, bn_mode,
                            batch_stats=variables["batch_stats"], steps_per_epoch=per_epoch,
                            total_steps=total)
  state = state.replace(opt_state=jax.eval_shape(tx.init, state.trainable))
  state = _abstract(state, sharding_lib.replicated(mesh))
  fn = step_lib.compile_train_step(model, tx, config.loss, mesh, state, head=family_head,
                                   seed=config.seed)
  notes = []
  if batch_per_chip is None:
    batch_per_chip, notes = train_batch_per_chip(config, mesh)
  n = sharding_lib.data_parallelism(mesh)
  glob = batch_per_chip * n
  bs = sharding_lib.batch_sharding(mesh)
  if config.train.mining == "epoch":
    k = 2 + int(config.loss.num_negatives)
    batch = {"image": _sds((glob, k, size, size, 3), jnp.uint8, bs),
             "mask": _sds((glob, k, size, size), jnp.bool_, bs),
             "weight": _sds((glob,), jnp.float32, bs)}
    images, shapes = glob * k, f"{glob} tuples x {k} x {size}^2"
  else:
    batch = {"image": _sds((glob, size, size, 3), jnp.uint8, bs),
             "label": _sds((glob,), jnp.int32, bs)}
    if config.data.train_resize == "long_side":
      batch["mask"] = _sds((glob, size, size), jnp.bool_, bs)
    images, shapes = glob, f"{glob} x {size}^2"
  return Program("train", fn, (state, batch), images, shapes=shapes,
                 batch_per_chip=batch_per_chip, notes=notes)


def _buckets(config, side: int):
  buckets = transforms.square_buckets(side)
  return buckets[-1:] if config.compile.extract_buckets == "largest" else buckets


def _images(batch: int, h: int, w: int, bs):
  return _sds((batch, h, w, 3), jnp.uint8, bs), _sds((batch, h, w), jnp.bool_, bs)


def extract_programs(config, mesh) -> List[Program]:
  """The descriptor extraction of `extract.py` for every bucket (and scale pass)."""
  model = networks.build_network(config.model)
  variables = _abstract(abstract_variables(model, 64, config.seed),
                        sharding_lib.replicated(mesh))
  n = sharding_lib.data_parallelism(mesh)
  batch = _round_up(config.extract.batch_size, n)
  bs = sharding_lib.batch_sharding(mesh)
  ext = config.extract
  scales = tuple(float(s) for s in ext.scales)
  side = int(ext.long_side)
  protocol = protocol_lib.from_switches(ext)
  describe = extract_lib.make_describe_fn(model, mesh)
  out = []
  if len(scales) > 1 and ext.multiscale_combine == "early_fusion":
    fused = extract_lib.make_fused_describe_fn(model, mesh)
    order = sorted(scales, reverse=True)
    top_side = max(1, int(round(side * order[0])))
    for h, w in _buckets(config, top_side):
      ims, masks = zip(*[_images(batch, max(1, math.ceil(h * s / order[0])),
                                 max(1, math.ceil(w * s / order[0])), bs) for s in order])
      out.append(Program(f"extract_fused_{h}x{w}", fused, (variables, tuple(ims), tuple(masks)),
                         batch, shapes=f"{batch} x {h}x{w}, {len(order)} scales fused",
                         batch_per_chip=batch // n))
  elif len(scales) > 1 and protocol.multiscale_resize == "interpolate":
    fn = extract_lib.make_multiscale_describe_fn(describe, scales)
    for h, w in _buckets(config, side):
      out.append(Program(f"extract_{h}x{w}_x{len(scales)}", fn,
                         (variables,) + _images(batch, h, w, bs), batch,
                         shapes=f"{batch} x {h}x{w}, scales {scales}", batch_per_chip=batch // n))
  else:
    for s in scales:
      for h, w in _buckets(config, max(1, int(round(side * s)))):
        out.append(Program(f"extract_{h}x{w}", describe, (variables,) + _images(batch, h, w, bs),
                           batch, shapes=f"{batch} x {h}x{w}", batch_per_chip=batch // n))
  return out


def local_programs(config, mesh) -> List[Program]:
  """DELG's local-feature selection per bucket and pyramid scale (model.local_head only)."""
  if not config.model.local_head:
    return []
  model = networks.build_network(config.model)
  variables = _abstract(abstract_variables(model, 64, config.seed),
                        sharding_lib.replicated(mesh))
  n = sharding_lib.data_parallelism(mesh)
  batch = _round_up(config.extract.batch_size, n)
  bs = sharding_lib.batch_sharding(mesh)
  fn = keypoints.make_select_fn(model, mesh, int(config.extract.local_max_features))
  side = int(config.extract.local_long_side or config.extract.long_side)
  out = []
  for h, w in _buckets(config, side):
    for s in config.extract.local_scales:
      # The levels `keypoints.keypoints_of_batch` feeds (`delg_input.pyramid_level`).
      sh, sw = delg_input.padded_level_shape(h, w, float(s))
      images = (_sds((batch, sh, sw, 3), delg_input.level_dtype(float(s)), bs),
                _sds((batch, sh, sw), jnp.bool_, bs))
      out.append(Program(f"local_{sh}x{sw}", fn, (variables,) + images,
                         batch, shapes=f"{batch} x {sh}x{sw} (bucket {h}x{w}, scale {s})",
                         batch_per_chip=batch // n))
  return out


def epoch_describe_program(config, mesh) -> List[Program]:
  """Epoch mining's description of queries and pool at the training size (train.mining=epoch)."""
  if config.train.mining != "epoch":
    return []
  model = networks.build_network(config.model)
  variables = _abstract(abstract_variables(model, 64, config.seed),
                        sharding_lib.replicated(mesh))
  n = sharding_lib.data_parallelism(mesh)
  batch = _round_up(config.extract.batch_size, n)
  size = int(config.data.image_size)
  fn = extract_lib.make_describe_fn(model, mesh)
  return [Program("mine_describe", fn,
                  (variables,) + _images(batch, size, size, sharding_lib.batch_sharding(mesh)),
                  batch, shapes=f"{batch} x {size}^2", batch_per_chip=batch // n)]


def search_program(config, mesh) -> List[Program]:
  """Exact top-k of `knn.knn` over a database of compile.search_db_size rows: as in a run,
  the database is visited `knn.DB_BLOCK` rows at a time (the compiled block program), so one
  query batch takes ceil(rows / block) calls."""
  c = config.compile
  model = networks.build_network(config.model)
  dim = descriptor_dim(model, abstract_variables(model, 64, config.seed), 64)
  n = sharding_lib.data_parallelism(mesh)
  rows = _round_up(c.search_db_size, n)
  block = _round_up(min(search_lib.DB_BLOCK, rows), n)
  blocks = math.ceil(rows / block)
  k = min(int(c.search_k), block)
  dtype = jnp.bfloat16 if c.search_dtype == "bfloat16" else jnp.float32
  fn = search_lib._sharded_topk_fn(mesh, k, dtype)  # pylint: disable=protected-access
  axis = sharding_lib.data_axis(mesh)
  db_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis, None))
  qb = min(int(c.search_query_batch), int(c.search_queries))
  args = (_sds((qb, dim), jnp.float32, sharding_lib.replicated(mesh)),
          _sds((block, dim), jnp.float32, db_sharding),
          _sds((), jnp.int32, sharding_lib.replicated(mesh)))
  return [Program("search", fn, args, qb / blocks, unit="queries", calls=blocks,
                  shapes=f"{qb} queries x {block}-row blocks of {rows} x {dim} "
                         f"{c.search_dtype}, top {k}",
                  notes=[f"{c.search_queries} queries = {math.ceil(int(c.search_queries) / qb)} "
                         f"query batches x {blocks} database blocks (calls)"])]


BUILDERS = {"train": lambda c, m: [train_program(c, m)] + epoch_describe_program(c, m),
            "extract": extract_programs, "local": local_programs, "search": search_program}


def build(config, mesh, names) -> List[Program]:
  """The programs of `names` (a subset of `BUILDERS`) for `config` on `mesh`."""
  out = []
  for name in names:
    out.extend(BUILDERS[name](config, mesh))
  return out
