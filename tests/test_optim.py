"""optim.py against torch.optim and hand-computed schedules."""
import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import common
from retrieval_jax.train import optim
from retrieval_jax.models import retrieval_net


def optim_config(**overrides):
  c = common.base_config().optim
  with c.unlocked():
    c.schedule = "constant"
    for k, v in overrides.items():
      c[k] = v
  return c


def _params(rng):
  """A small tree with a trunk group and a GeM-like pool group."""
  return {"backbone": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
                       "bn": {"scale": rng.normal(size=(4,)).astype(np.float32)}},
          "pool": {"p": np.array([3.0], np.float32)},
          "whiten": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}}


def _run_optax(c, params, grads_seq, **kw):
  tx = optim.make_optimizer(c, params, **kw)
  state = tx.init(params)
  out = []
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(jax.tree_util.tree_map(np.asarray, params))
  return out


def _run_torch(make_opt, params, grads_seq):
  flat = traverse_util.flatten_dict(params)
  tensors = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in flat.items()}
  feature_keys = [k for k in tensors if k[0] != "pool"]
  opt = make_opt([{"params": [tensors[k] for k in feature_keys]},
                  {"params": [tensors[("pool", "p")]], "pool": True}])
  out = []
  for grads in grads_seq:
    g = traverse_util.flatten_dict(grads)
    for k, t in tensors.items():
      t.grad = torch.tensor(np.array(g[k]))
    opt.step()
    out.append(traverse_util.unflatten_dict({k: t.detach().numpy().copy()
                                             for k, t in tensors.items()}))
  return out


def _grads(rng, params, n):
  return [jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.1,
                                 params) for _ in range(n)]


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_steps_equal_torch(decoupled):
  """Coupled wd = torch.optim.Adam(weight_decay); decoupled = torch.optim.AdamW; pool: 10x, no wd."""
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads = _grads(rng, params, 4)
  lr, wd = 1e-2, 0.05  # large, so that a wrong weight-decay form shows
  c = optim_config(lr=lr, weight_decay=wd, decoupled_weight_decay=decoupled)
  ours = _run_optax(c, params, grads)
  cls = torch.optim.AdamW if decoupled else torch.optim.Adam

  def make(groups):
    groups[1].update(lr=10 * lr, weight_decay=0.0)
    return cls(groups, lr=lr, weight_decay=wd)

  ref = _run_torch(make, params, grads)
  for a, b in zip(ours, ref):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  # The other form of weight decay gives a different result: the test can tell them apart.
  other = _run_optax(optim_config(lr=lr, weight_decay=wd, decoupled_weight_decay=not decoupled),
                     params, grads)
  assert not np.allclose(other[-1]["backbone"]["conv"]["kernel"],
                         ref[-1]["backbone"]["conv"]["kernel"], rtol=1e-5, atol=1e-7)


def test_sgd_steps_equal_torch():
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads = _grads(rng, params, 3)
  c = optim_config(name="sgd", lr=0.1, weight_decay=0.01, momentum=0.9)
  ours = _run_optax(c, params, grads)

  def make(groups):
    groups[1].update(lr=1.0, weight_decay=0.0)
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01)

  ref = _run_torch(make, params, grads)
  for x, y in zip(jax.tree_util.tree_leaves(ours[-1]), jax.tree_util.tree_leaves(ref[-1])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_pool_param_gets_ten_times_the_lr_and_no_decay():
  params = {"backbone": {"w": np.ones((2,), np.float32)}, "pool": {"p": np.full((1,), 3.0,
                                                                                  np.float32)}}
  grads = {"backbone": {"w": np.full((2,), 0.5, np.float32)},
           "pool": {"p": np.full((1,), 0.5, np.float32)}}
  # Adam's first step is lr * g / (|g| + eps) ~ lr: the pool moves 10x as far.
  out = _run_optax(optim_config(lr=1e-3, weight_decay=0.5), params, [grads])[0]
  np.testing.assert_allclose(3.0 - out["pool"]["p"][0], 10 * 1e-3, rtol=1e-4)
  np.testing.assert_allclose(1.0 - out["backbone"]["w"][0], 1e-3, rtol=1e-4)
  # With a zero gradient only weight decay moves a param: the trunk moves, p does not.
  zero = jax.tree_util.tree_map(np.zeros_like, grads)
  out = _run_optax(optim_config(lr=1e-3, weight_decay=0.5), params, [zero])[0]
  np.testing.assert_allclose(1.0 - out["backbone"]["w"][0], 1e-3, rtol=1e-4)
  assert out["pool"]["p"][0] == 3.0
  assert optim.param_labels(params)["pool"]["p"] == "pool"


def test_exp_schedule_is_the_reference_per_epoch_decay():
  c = optim_config(lr=5e-7, schedule="exp")
  sched = optim.learning_rate_schedule(c, steps_per_epoch=10)
  for step in (0, 9, 10, 25, 999):
    np.testing.assert_allclose(float(sched(step)), 5e-7 * math.exp(-0.01 * (step // 10)),
                               rtol=1e-6)


def test_warmup_then_cosine():
  c = optim_config(lr=1.0, schedule="cosine", warmup_steps=10, decay_steps=110,
                   cosine_alpha=0.1)
  sched = optim.learning_rate_schedule(c)
  np.testing.assert_allclose(float(sched(0)), 0.0)
  np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
  for step in (10, 35, 60, 110, 200):
    t = min(step - 10, 100) / 100
    want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5)


def _tiny_variables(bn_mode):
  model = retrieval_net.RetrievalNet(
      backbone="resnet18", backbone_kwargs={"bn_mode": bn_mode, "width": 4,
                                            "stage_sizes": (1, 1, 1, 1)})
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))


def test_frozen_bn_and_regex_params_do_not_move():
  variables = _tiny_variables("frozen")
  params = jax.tree_util.tree_map(lambda s: np.ones(s.shape, np.float32), variables["params"])
  labels = traverse_util.flatten_dict(optim.param_labels(
      params, freeze=r"^backbone/stem/", freeze_bn=True, batch_stats=variables["batch_stats"]))
  bn = [k for k in labels if "bn" in k[:-1]]
  assert bn and all(labels[k] == "frozen" for k in bn)
  assert all(v == "frozen" for k, v in labels.items() if k[:2] == ("backbone", "stem"))
  assert labels[("backbone", "layer1_0", "conv1", "conv", "kernel")] == "default"
  assert labels[("pool", "p")] == "pool"
  c = optim_config(lr=0.1, freeze=r"^backbone/stem/")
  grads = jax.tree_util.tree_map(lambda x: np.full(x.shape, 0.3, np.float32), params)
  out = _run_optax(c, params, [grads, grads], bn_mode="frozen",
                   batch_stats=variables["batch_stats"])[-1]
  flat_in, flat_out = traverse_util.flatten_dict(params), traverse_util.flatten_dict(out)
  for k, v in labels.items():
    moved = not np.array_equal(flat_in[k], flat_out[k])
    assert moved == (v != "frozen"), k
  # bn_mode="frozen_stats" trains BN scale/shift (running statistics stay fixed in the model).
  trained = optim.param_labels(params, freeze_bn=False, batch_stats=variables["batch_stats"])
  assert all(traverse_util.flatten_dict(trained)[k] == "default" for k in bn)


def test_accumulated_steps_sum_gradients():
  """k micro-steps = one update with the summed gradient (the reference's batch of tuples)."""
  rng = np.random.default_rng(2)
  params = _params(rng)
  grads = _grads(rng, params, 3)
  c = optim_config(lr=1e-2, weight_decay=0.05, accumulate_steps=3)
  seq = _run_optax(c, params, grads)
  for before in seq[:2]:  # no update until the third micro-step
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                    jax.tree_util.tree_leaves(params)))
  total = jax.tree_util.tree_map(lambda *g: sum(g), *grads)
  once = _run_optax(optim_config(lr=1e-2, weight_decay=0.05), params, [total])[0]
  for x, y in zip(jax.tree_util.tree_leaves(seq[2]), jax.tree_util.tree_leaves(once)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)


def test_grad_clip_uses_the_global_norm():
  params = {"backbone": {"w": np.zeros((2,), np.float32)}, "pool": {"p": np.zeros((1,),
                                                                                  np.float32)}}
  grads = {"backbone": {"w": np.array([3.0, 0.0], np.float32)},
           "pool": {"p": np.array([4.0], np.float32)}}
  c = optim_config(name="sgd", lr=1.0, weight_decay=0.0, momentum=0.0, grad_clip=1.0,
                   pool_lr_mult=1.0)
  out = _run_optax(c, params, [grads])[0]
  np.testing.assert_allclose(out["backbone"]["w"], [-0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out["pool"]["p"], [-0.8], rtol=1e-6)


def test_head_group():
  params = {"model": {"backbone": {"w": np.ones((2,), np.float32)}},
            "head": {"kernel": np.ones((2, 3), np.float32)}}
  labels = optim.param_labels(params)
  assert labels["head"]["kernel"] == "head" and labels["model"]["backbone"]["w"] == "default"
  grads = jax.tree_util.tree_map(lambda x: np.full(x.shape, 0.5, np.float32), params)
  out = _run_optax(optim_config(lr=1e-3, weight_decay=0.0, head_lr_mult=2.0), params,
                   [grads])[0]
  np.testing.assert_allclose(1.0 - out["head"]["kernel"], 2e-3, rtol=1e-4)
