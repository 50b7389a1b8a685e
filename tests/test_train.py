"""The training loop: exact resume, one trace per shape, NaN handling, epoch tuples, heads.

A tiny ResNet-18 (width 8, one block per stage, no pretrained weights) on the demo set at
32 x 32 pixels, on 8 fake CPU devices, with evaluation disabled.
"""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import demo as demo_config
from retrieval_jax import checkpointing
from retrieval_jax import restore
from retrieval_jax import sharding
from retrieval_jax.data import datasets
from retrieval_jax.data import demo
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import tuples
from retrieval_jax.mining import pairs as pairs_lib
from retrieval_jax.models import retrieval_net
from retrieval_jax.train import inputs as inputs_lib
from retrieval_jax.train import loop as train_loop
from retrieval_jax.train import state as train_state
from retrieval_jax.train import step as train_step


TINY_BACKBONE = {"bn_mode": "frozen_stats", "width": 8, "stage_sizes": (1, 1, 1, 1)}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo"))
  demo.build(root, seed=0)
  return root


def tiny_config(root, **overrides):
  """The demo config on a tiny ResNet-18; overrides as {"train.num_steps": 4, ...}."""
  c = demo_config.get_config()
  with c.unlocked():
    c.data.root = root
    c.data.image_size = 32
    c.data.classes_per_batch = 4
    c.data.images_per_class = 2
    c.model.backbone = "resnet18"
    c.model.backbone_kwargs = dict(TINY_BACKBONE)
    c.model.pretrained = ""
    c.eval.dataset = ""
    c.train.log_every = 1
    c.train.checkpoint_every = 100
    c.train.eval_before = False
    for key, value in overrides.items():
      section, name = key.split(".")
      c[section][name] = value
  return c


EPOCH = {"train.mining": "epoch", "data.query_size": 16, "data.pool_size": 60,
         "data.tuples_per_batch": 5, "loss.num_negatives": 2}


def _leaves_equal(a, b):
  fa, fb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(fa) == len(fb)
  return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(fa, fb))


# ----------------------------------------------------------------------------------------------
# 1. Kill and resume.


@pytest.mark.parametrize("mode", ["in_batch", "epoch"])
def test_interrupted_run_resumes_bitwise(demo_root, tmp_path, mode):
  """Stopped after k steps and resumed == uninterrupted, bit for bit (params, Adam moments)."""
  extra = EPOCH if mode == "epoch" else {}
  # Epoch mode: 3 steps per epoch (16 // 5), so step 4 is inside the second epoch.
  n, k = (4, 2) if mode == "in_batch" else (5, 4)
  full = str(tmp_path / "full")
  train_loop.train_and_evaluate(tiny_config(demo_root, **{"train.num_steps": n}, **extra), full)
  part = str(tmp_path / "part")
  out = train_loop.train_and_evaluate(
      tiny_config(demo_root, **{"train.num_steps": n, "train.stop_after": k}, **extra), part)
  assert out["after"] is None
  assert checkpointing.manager(part).latest_step() == k
  train_loop.train_and_evaluate(tiny_config(demo_root, **{"train.num_steps": n}, **extra), part)
  a, b = checkpointing.read_state(full, n), checkpointing.read_state(part, n)
  assert int(a["step"]) == int(b["step"]) == n
  assert _leaves_equal(a["params"], b["params"])
  assert _leaves_equal(a["opt_state"], b["opt_state"])
  init = checkpointing.read_state(part, k)
  assert not _leaves_equal(init["params"], b["params"])  # it did train after resuming


def test_restored_iterator_yields_the_next_batch(demo_root, tmp_path):
  train_set = datasets.get_dataset("demo", demo_root, "train")
  ds = grain_pipeline.train_dataset(train_set.images, train_set.labels, classes_per_batch=4,
                                    images_per_class=2, image_size=32, seed=0, num_steps=6)
  it = grain_pipeline.train_iterator(ds)
  for _ in range(3):
    next(it)
  mgr = checkpointing.manager(str(tmp_path))
  state = {"x": jnp.ones((2,))}
  checkpointing.save(mgr, 3, state, it)
  mgr.wait_until_finished()
  expected = next(it)
  fresh = grain_pipeline.train_iterator(ds)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  _, step = checkpointing.restore(checkpointing.manager(str(tmp_path)), abstract, fresh)
  assert step == 3
  got = next(fresh)
  np.testing.assert_array_equal(got["image"], expected["image"])
  np.testing.assert_array_equal(got["label"], expected["label"])


def test_incomplete_checkpoint_is_ignored(demo_root, tmp_path):
  """A save killed midway leaves `<step>.orbax-checkpoint-tmp`, which resume never picks."""
  workdir = str(tmp_path)
  mgr = checkpointing.manager(workdir)
  checkpointing.save(mgr, 2, {"x": jnp.arange(3.0)})
  mgr.wait_until_finished()
  torn = os.path.join(checkpointing.checkpoint_dir(workdir), "5.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(torn, "state"))
  assert checkpointing.manager(workdir).latest_step() == 2
  np.testing.assert_array_equal(checkpointing.read_state(workdir)["x"], np.arange(3.0))


# ----------------------------------------------------------------------------------------------
# 2. One compiled step per shape.


def test_train_step_traces_once(demo_root):
  c = tiny_config(demo_root)
  mesh = sharding.make_mesh()
  model, tx, state = train_state.create(c, mesh)
  step_fn = train_step.compile_train_step(model, tx, c.loss, mesh, state, max_traces=1)
  train_set = datasets.get_dataset("demo", demo_root, "train")
  ds = grain_pipeline.train_dataset(train_set.images, train_set.labels, classes_per_batch=4,
                                    images_per_class=2, image_size=32, seed=0, num_steps=4)
  for s in range(3):
    state, metrics = step_fn(state, sharding.to_global(ds[s], mesh))
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
  # Another shape is another trace: the guard turns a silent recompile into an error.
  bigger = {k: np.concatenate([v, v]) for k, v in ds[3].items()}
  with pytest.raises(AssertionError, match="traced > 1"):
    step_fn(state, sharding.to_global(bigger, mesh))
  chex.clear_trace_counter()


# ----------------------------------------------------------------------------------------------
# 3. NaN / Inf.


def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoint(demo_root, tmp_path):
  workdir = str(tmp_path)
  train_loop.train_and_evaluate(tiny_config(demo_root, **{"train.num_steps": 2}), workdir)
  good = checkpointing.read_state(workdir, 2)
  c = tiny_config(demo_root, **{"train.num_steps": 6, "optim.lr": 1e30,
                                "train.checkpoint_every": 1})
  with pytest.raises(train_loop.NonFiniteLossError) as err:
    train_loop.train_and_evaluate(c, workdir)
  message = str(err.value)
  assert "at step 3" in message and "(step 2) is kept" in message and "optim.lr" in message
  assert checkpointing.manager(workdir).latest_step() == 2
  assert _leaves_equal(checkpointing.read_state(workdir, 2)["params"], good["params"])


# ----------------------------------------------------------------------------------------------
# 4. Model dtype.


def test_bfloat16_compute_keeps_float32_master_params(demo_root):
  c = tiny_config(demo_root, **{"model.dtype": "bfloat16"})
  mesh = sharding.make_mesh()
  model, tx, state = train_state.create(c, mesh)
  step_fn = train_step.compile_train_step(model, tx, c.loss, mesh, state)
  train_set = datasets.get_dataset("demo", demo_root, "train")
  ds = grain_pipeline.train_dataset(train_set.images, train_set.labels, classes_per_batch=4,
                                    images_per_class=2, image_size=32, seed=0, num_steps=1)
  batch = sharding.to_global(ds[0], mesh)
  # The trunk really runs in bf16: its feature map differs from the float32 one.
  f32 = model.clone(dtype="float32")
  a = f32.apply(state.variables, batch["image"])["feature_map"]
  b = model.apply(state.variables, batch["image"])["feature_map"]
  assert not np.allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(a, b, atol=0.1 * float(jnp.abs(a).max()))
  state, metrics = step_fn(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype("float32")}


# ----------------------------------------------------------------------------------------------
# 5. Epoch-level tuples.


def test_training_pairs_from_labels():
  q, p = pairs_lib.training_pairs(np.array([0, 0, 1, 1, 1, 2, -1, -1]))
  pairs = set(zip(q.tolist(), p.tolist()))
  assert pairs == {(0, 1), (1, 0), (2, 3), (2, 4), (3, 2), (3, 4), (4, 2), (4, 3)}
  q2, p2 = pairs_lib.training_pairs(np.zeros(4), np.array([3, 1]), np.array([0, 2]))
  assert q2.tolist() == [3, 1] and p2.tolist() == [0, 2]


def test_tuple_dataset_is_deterministic_and_padded(demo_root):
  train_set = datasets.get_dataset("demo", demo_root, "train")
  q, p = pairs_lib.training_pairs(train_set.labels)
  n = np.arange(12 * 2).reshape(12, 2)
  make = lambda epoch: tuples.tuple_dataset(
      train_set.images, q[:12], p[:12], n, tuples_per_step=5, image_size=32, seed=0,
      epoch=epoch, pad_multiple=8)
  ds = make(0)
  assert len(ds) == 2  # 12 // 5, the partial batch dropped
  a, b, other = ds[1], make(0)[1], make(1)[1]
  assert a["image"].shape == (8, 4, 32, 32, 3) and a["mask"].shape == (8, 4, 32, 32)
  np.testing.assert_array_equal(a["weight"], [1] * 5 + [0] * 3)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], other["image"])  # another epoch, another order
  # Whole images, long side resized to 32: the mask marks the real pixels.
  assert a["mask"].any(axis=(2, 3)).all() and not a["mask"].all()


def test_epoch_mining_picks_hardest_negatives_of_distinct_clusters(demo_root, tmp_path):
  c = tiny_config(demo_root, **EPOCH)
  mesh = sharding.make_mesh()
  train_set = datasets.get_dataset("demo", demo_root, "train")
  model, _, state = train_state.create(c, mesh)
  inputs = inputs_lib.make_inputs(c, train_set, mesh, model, str(tmp_path))
  qidxs, pidxs, nidxs = inputs.mine(0, state.variables)
  labels = np.asarray(train_set.labels)
  assert qidxs.shape == (16,) and nidxs.shape == (16, 2)
  assert (labels[qidxs] == labels[pidxs]).all() and (qidxs != pidxs).all()
  pool = tuples.negative_pool(len(train_set.images), 60, c.seed, 0)
  assert np.isin(nidxs, pool).all()
  for qi, row in zip(qidxs, nidxs):
    assert labels[qi] not in labels[row]  # never the query's cluster
    assert len(set(labels[row].tolist())) == len(row)  # at most one per cluster
  # The first negative is the most similar pool image outside the query's cluster, with
  # descriptors computed here one image at a time: PIL's bilinear long-side resize to 32
  # (never enlarged), unpadded, no mask, through `model.apply` (not the miner's batched,
  # padded, sharded `describe`). A near tie (< 1e-4) may go either way.
  def descriptor(i):
    im = Image.open(train_set.images[i]).convert("RGB")
    scale = c.data.image_size / max(im.size)
    if scale < 1:
      im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    return np.asarray(model.apply(state.variables, np.asarray(im)[None])["descriptor"])[0]

  pv = np.stack([descriptor(i) for i in pool])
  np.testing.assert_allclose(np.linalg.norm(pv, axis=1), 1.0, atol=1e-3)
  for i, qi in enumerate(qidxs):
    scores = np.where(labels[pool] == labels[qi], -np.inf, pv @ descriptor(qi))
    chosen = scores[pool == nidxs[i, 0]][0]
    assert chosen >= scores.max() - 1e-4, (i, chosen, scores.max())
  assert len(set(nidxs[:, 0].tolist())) > 1  # not one image for every query
  # Same seed and epoch, same params: the same tuples.
  again = inputs.mine(0, state.variables)
  assert all(np.array_equal(x, y) for x, y in zip((qidxs, pidxs, nidxs), again))
  # A negative that turns out truncated (it passed the header check) is dropped from the
  # pool, not a crash: the other queries keep their negatives (issue 18).
  hardest = nidxs[0, 0]
  truncated = tmp_path / "truncated.jpg"
  with open(train_set.images[hardest], "rb") as f:
    truncated.write_bytes(f.read()[:200])
  inputs.images[hardest] = str(truncated)
  _, _, dropped = inputs.mine(0, state.variables)
  assert hardest not in dropped and dropped.shape == nidxs.shape
  untouched = ~(nidxs == hardest).any(axis=1)
  np.testing.assert_array_equal(dropped[untouched], nidxs[untouched])


# ----------------------------------------------------------------------------------------------
# 6-7. ArcFace head and Vaccaro triplets.


def test_arcface_head_trains_beside_the_model_and_is_dropped_at_extraction(demo_root, tmp_path):
  workdir = str(tmp_path)
  c = tiny_config(demo_root, **{"loss.name": "arcface", "loss.margin": 0.2,
                                "loss.scale": 16.0, "data.sampler": "shuffle",
                                "data.batch_size": 16, "train.num_steps": 3,
                                "optim.lr": 1e-3})
  train_loop.train_and_evaluate(c, workdir)
  state = checkpointing.read_state(workdir)
  num_classes = len(np.unique(datasets.get_dataset("demo", demo_root, "train").labels))
  kernel = state["head"]["kernel"]
  assert kernel.shape == (8 * 8, num_classes)  # [D, C]: D = 8 x width channels
  mesh = sharding.make_mesh()
  _, tx, fresh = train_state.create(c, mesh, num_classes=num_classes)
  assert not np.allclose(np.asarray(fresh.head["kernel"]), kernel)  # the head was trained
  _, variables, step, source = restore.restore_model(c, workdir, mesh)
  assert source == restore.CHECKPOINT
  assert step == 3 and set(variables) == {"params", "batch_stats"}
  np.testing.assert_array_equal(np.asarray(variables["params"]["pool"]["p"]),
                                state["params"]["pool"]["p"])


def test_vaccaro_triplet_loss_trains(demo_root, tmp_path):
  c = tiny_config(demo_root, **{"loss.name": "vaccaro_triplet", "loss.margin": 0.1,
                                "loss.vaccaro_t": 4, "data.classes_per_batch": 8,
                                "train.num_steps": 2})
  train_loop.train_and_evaluate(c, str(tmp_path))
  lines = open(os.path.join(tmp_path, "metrics.jsonl")).read().splitlines()
  assert len(lines) == 2 and all('"num_triplets"' in line for line in lines)
  state = checkpointing.read_state(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))


def test_tuple_loss_is_the_reference_sum_and_ignores_padding():
  """cirtorch's ContrastiveLoss per tuple (q, p, n1, n2), summed; padding tuples weigh 0."""
  rng = np.random.default_rng(0)
  desc = rng.normal(size=(3, 4, 8)).astype(np.float32)
  desc /= np.linalg.norm(desc, axis=-1, keepdims=True)
  weight = np.array([1.0, 1.0, 0.0], np.float32)
  c = tiny_config("").loss
  c.margin = 0.7

  def reference(t):
    d = np.sqrt(np.sum((desc[t, :1] - desc[t, 1:] + 1e-6) ** 2, -1))  # q vs p, n1, n2
    return 0.5 * d[0] ** 2 + np.sum(0.5 * np.maximum(0.7 - d[1:], 0) ** 2)

  fn = lambda x: train_step._tuple_loss(x, jnp.asarray(weight), c)[0]  # pylint: disable=protected-access
  np.testing.assert_allclose(float(fn(jnp.asarray(desc))), reference(0) + reference(1),
                             rtol=1e-5)
  grad = np.asarray(jax.grad(fn)(jnp.asarray(desc)))
  assert np.abs(grad[:2]).sum() > 0 and not grad[2].any()


def test_five_tuples_per_step_equal_one_tuple_accumulated_five_times(demo_root, tmp_path):
  """The reference's batch of 5 tuples two ways: padded to 8 devices, or 1 tuple x 5 steps."""
  common = dict(EPOCH, **{"optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.9,
                          "optim.weight_decay": 1e-4})
  wide = str(tmp_path / "wide")
  train_loop.train_and_evaluate(tiny_config(demo_root, **common, **{"train.num_steps": 2}), wide)
  accumulated = str(tmp_path / "acc")
  train_loop.train_and_evaluate(tiny_config(
      demo_root, **dict(common, **{"data.tuples_per_batch": 1, "optim.accumulate_steps": 5,
                                   "train.num_steps": 10})), accumulated)
  a = checkpointing.read_state(wide)["params"]
  b = checkpointing.read_state(accumulated)["params"]
  init = restore.init_variables(
      retrieval_net.build_retrieval_net(tiny_config(demo_root).model), 32,
      jax.random.key(0), tiny_config(demo_root).model.pretrained)["params"]
  moved_leaves = 0
  for x, y, x0 in zip(*(jax.tree_util.tree_leaves(t) for t in (a, b, init))):
    moved = np.abs(np.asarray(x) - np.asarray(x0)).max()
    moved_leaves += moved > 1e-5
    np.testing.assert_allclose(y, x, atol=1e-4 * moved + 1e-7)
  assert moved_leaves > len(jax.tree_util.tree_leaves(a)) // 2
