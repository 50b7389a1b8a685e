"""Poolings against loop-based numpy / torch re-derivations of the papers' formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.models import netvlad
from retrieval_jax.models import pooling
from retrieval_jax.models import pooling_ops
from retrieval_jax.models import rmac_grid
from retrieval_jax.postprocess import clustering

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# Independent references.


def np_l2n(v, eps=1e-6):
  return v / (np.linalg.norm(v) + eps)


def np_normalize(v, eps=1e-12):
  return v / max(np.linalg.norm(v), eps)


def np_gem(x, p, eps=1e-6):
  """One image [h, w, C]; p scalar or [C]."""
  h, w, c = x.shape
  p = np.broadcast_to(np.asarray(p, np.float64), (c,))
  out = np.zeros(c)
  for ch in range(c):
    acc = 0.0
    for i in range(h):
      for j in range(w):
        acc += max(x[i, j, ch], eps) ** p[ch]
    out[ch] = (acc / (h * w)) ** (1.0 / p[ch])
  return out


def torch_rmac_boxes(h, w, levels):
  """cirtorch `rmac()`'s region loop, transcribed with torch, regions as (t, l, b, r)."""
  torch = pytest.importorskip("torch")
  ovr = 0.4
  steps = torch.Tensor([2, 3, 4, 5, 6, 7])
  W, H = w, h
  wmin = min(W, H)
  b = (max(H, W) - wmin) / (steps - 1)
  _, idx = torch.min(torch.abs(((wmin ** 2 - wmin * b) / wmin ** 2) - ovr), 0)
  Wd = Hd = 0
  if H < W:
    Wd = idx.item() + 1
  elif H > W:
    Hd = idx.item() + 1
  boxes = [(0, 0, H, W)]
  for l in range(1, levels + 1):
    wl = math.floor(2 * wmin / (l + 1))
    wl2 = math.floor(wl / 2 - 1)
    b = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
    cenW = torch.floor(wl2 + torch.Tensor(range(l - 1 + Wd + 1)) * b) - wl2
    b = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
    cenH = torch.floor(wl2 + torch.Tensor(range(l - 1 + Hd + 1)) * b) - wl2
    for i_ in cenH.tolist():
      for j_ in cenW.tolist():
        if wl == 0:
          continue
        boxes.append((int(i_), int(j_), int(i_) + wl, int(j_) + wl))
  return boxes


def np_regional(x, levels, pool_fn):
  """Regional pooling of one image [h, w, C] over the reference boxes, l2n, sum, l2n."""
  h, w, _ = x.shape
  v = 0.0
  for t, l, b, r in torch_rmac_boxes(h, w, levels):
    v = v + np_l2n(pool_fn(x[t:b, l:r]))
  return np_l2n(v)


def np_seddati(x, levels=3):
  h, w, c = x.shape
  v = np.zeros(c)
  for l in range(1, levels + 1):
    k = max(1, math.ceil(2 * min(h, w) / (l + 1)))
    s = max(1, math.floor(0.4 * k))
    acc = np.zeros(c)
    for i in range(0, h - k + 1, s):
      for j in range(0, w - k + 1, s):
        acc += x[i:i + k, j:j + k].max(axis=(0, 1)) ** 2
    v += np.sqrt(acc)
  return np_l2n(v)


def np_vlad(descs, centroids, alpha):
  """descs: list of [C] vectors; NetVLAD with tied assignment."""
  k, c = centroids.shape
  v = np.zeros((k, c))
  for x in descs:
    x = np_normalize(np.asarray(x, np.float64))
    logits = np.array([alpha * (2 * centroids[j] @ x - centroids[j] @ centroids[j])
                       for j in range(k)])
    a = np.exp(logits - logits.max())
    a /= a.sum()
    for j in range(k):
      v[j] += a[j] * (x - centroids[j])
  v = np.stack([np_normalize(r) for r in v])
  return np_normalize(v.reshape(-1))


def np_columns(x, windows):
  h, w, _ = x.shape
  out = []
  for k in windows:
    for i in range(h - k + 1):
      for j in range(w - k + 1):
        out.append(x[i:i + k, j:j + k].max(axis=(0, 1)))
  return out


def padded_batch(maps, garbage=50.0):
  """Pads [h_i, w_i, C] maps bottom/right into one batch whose padding holds large garbage."""
  hmax = max(m.shape[0] for m in maps)
  wmax = max(m.shape[1] for m in maps)
  c = maps[0].shape[2]
  x = garbage + RNG.random((len(maps), hmax, wmax, c)).astype(np.float32)
  mask = np.zeros((len(maps), hmax, wmax), bool)
  for i, m in enumerate(maps):
    x[i, :m.shape[0], :m.shape[1]] = m
    mask[i, :m.shape[0], :m.shape[1]] = True
  return jnp.asarray(x), jnp.asarray(mask)


def relu_maps(sizes, c=5):
  return [np.maximum(RNG.standard_normal((h, w, c)), 0).astype(np.float32) + 0.01
          for h, w in sizes]


SIZES = [(7, 7), (7, 10), (10, 7), (4, 13), (13, 4), (1, 6), (2, 2), (3, 11)]


# ----------------------------------------------------------------------------------------------
# MAC / SPoC / GeM.


def test_global_poolings_vs_numpy():
  x = RNG.random((2, 4, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(pooling_ops.mac(x), x.max(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(pooling_ops.spoc(x), x.mean(axis=(1, 2)), rtol=1e-6)
  for b in range(2):
    np.testing.assert_allclose(pooling_ops.gem(x, 3.0)[b], np_gem(x[b], 3.0), rtol=1e-5)
    np.testing.assert_allclose(pooling_ops.gem(x, 2.5, eps=0.3)[b], np_gem(x[b], 2.5, 0.3),
                               rtol=1e-5)


def test_gem_special_cases():
  x = RNG.random((2, 4, 4, 6)).astype(np.float32) + 0.05
  np.testing.assert_allclose(pooling_ops.gem(x, 1.0), pooling_ops.spoc(x), rtol=1e-5)
  np.testing.assert_allclose(pooling_ops.gem(x, 200.0), pooling_ops.mac(x), rtol=0.03)
  p = np.array([1.0, 2.0, 3.0, 4.0, 6.0, 10.0], np.float32)
  per_channel = pooling_ops.gem(x, p)
  for ch in range(6):
    np.testing.assert_allclose(per_channel[:, ch], pooling_ops.gem(x[..., ch:ch + 1], p[ch])[:, 0],
                               rtol=1e-5)
  np.testing.assert_allclose(per_channel[0], np_gem(x[0], p), rtol=1e-5)


def test_bfloat16_input_computes_in_float32():
  x = RNG.random((1, 3, 3, 4)).astype(np.float32)
  out = pooling_ops.gem(jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, pooling_ops.gem(np.asarray(jnp.asarray(x, jnp.bfloat16),
                                                         np.float32)), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_masked_global_poolings_equal_unpadded(jit):
  maps = relu_maps(SIZES)
  x, mask = padded_batch(maps)
  x = x.at[0, -1, -1, 0].set(jnp.nan)  # NaN in padding must not leak either
  fns = {"mac": pooling_ops.mac, "spoc": pooling_ops.spoc,
         "gem": lambda a, m: pooling_ops.gem(a, 3.0, mask=m)}
  for name, fn in fns.items():
    f = jax.jit(fn) if jit else fn
    got = f(x, mask)
    for i, m in enumerate(maps):
      np.testing.assert_allclose(got[i], fn(m[None], None)[0], rtol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------
# R-MAC.


@pytest.mark.parametrize("h,w", [(7, 7), (7, 10), (10, 7), (4, 13), (13, 4), (30, 40),
                                 (40, 30), (5, 9), (1, 1), (2, 17), (64, 48)])
def test_rmac_regions_vs_reference(h, w):
  boxes = rmac_grid.rmac_regions(h, w, 3)
  ref = torch_rmac_boxes(h, w, 3)
  assert [tuple(b) for b in boxes.tolist()] == ref
  assert np.all(boxes[:, 2] <= h) and np.all(boxes[:, 3] <= w) and np.all(boxes >= 0)


def test_rmac_regions_counts():
  # Square map: 1 + 4 + 9 regions plus the global one; a 4:3 map adds one column per level.
  assert len(rmac_grid.rmac_regions(30, 30)) == 1 + 1 + 4 + 9
  assert len(rmac_grid.rmac_regions(30, 40)) == 1 + 2 + 6 + 12
  assert len(rmac_grid.rmac_regions(40, 30)) == 1 + 2 + 6 + 12


def test_rmac_regions_all_small_sizes_vs_reference():
  for h in range(1, 26):
    for w in range(1, 26):
      got = [tuple(b) for b in rmac_grid.rmac_regions(h, w, 3).tolist()]
      assert got == torch_rmac_boxes(h, w, 3), (h, w)


def test_traced_rmac_grid_equals_static_grid():
  """The jnp grid (from traced valid sizes) gives the same regions as rmac_regions."""
  n = 24
  hv, wv = np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1), indexing="ij")
  hv, wv = jnp.asarray(hv.ravel(), jnp.int32), jnp.asarray(wv.ravel(), jnp.int32)
  per_level = []
  for level in (1, 2, 3):
    fn = jax.jit(jax.vmap(lambda a, b, lv=level: rmac_grid.rmac_level_weights(a, b, lv, n, n, 3)))
    per_level.append([np.asarray(t) for t in fn(hv, wv)])
  for e, (h, w) in enumerate(zip(np.asarray(hv), np.asarray(wv))):
    expected = {}
    boxes = rmac_grid.rmac_regions(int(h), int(w), 3)[1:]
    for t, l, b, _ in boxes.tolist():
      expected[(b - t, t, l)] = expected.get((b - t, t, l), 0) + 1
    got = {}
    for wl, cnt_h, cnt_w in per_level:
      weight = np.outer(cnt_h[e], cnt_w[e])
      for t, l in zip(*np.nonzero(weight)):
        key = (int(wl[e]), int(t), int(l))
        got[key] = got.get(key, 0) + int(weight[t, l])
    assert got == expected, (h, w)


def test_rmac_values_vs_cirtorch():
  torch = pytest.importorskip("torch")
  x = RNG.standard_normal((2, 9, 13, 4)).astype(np.float32)
  xt = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())
  # cirtorch rmac(): global MAC + regions, each l2n, summed; the network applies L2N after.
  mp = torch.nn.functional.max_pool2d
  l2 = lambda t: t / (torch.norm(t, p=2, dim=1, keepdim=True) + 1e-6)
  v = l2(mp(xt, (9, 13)))
  for t, l, b, r in torch_rmac_boxes(9, 13, 3)[1:]:
    reg = xt[:, :, t:b, l:r]
    v = v + l2(mp(reg, (reg.size(-2), reg.size(-1))))
  ref = l2(v).squeeze(-1).squeeze(-1).numpy()
  np.testing.assert_allclose(pooling_ops.rmac(x), ref, rtol=1e-5, atol=1e-6)


def test_regional_gem_spoc_vs_numpy():
  x = relu_maps([(6, 9)], c=4)[0]
  np.testing.assert_allclose(
      pooling_ops.regional_pool(x[None], pool="gem", p=3.0)[0],
      np_regional(x, 3, lambda r: np_gem(r, 3.0)), rtol=1e-5)
  np.testing.assert_allclose(
      pooling_ops.regional_pool(x[None], pool="spoc")[0],
      np_regional(x, 3, lambda r: r.mean(axis=(0, 1))), rtol=1e-5)
  with pytest.raises(ValueError):
    pooling_ops.regional_pool(x[None], pool="max")


NP_POOLS = {"mac": lambda r: r.max(axis=(0, 1)),
            "spoc": lambda r: r.mean(axis=(0, 1)),
            "gem": lambda r: (np.maximum(r, 1e-6) ** 3.0).mean(axis=(0, 1)) ** (1 / 3.0)}


@pytest.mark.parametrize("pool,jit", [("mac", False), ("mac", True), ("spoc", True),
                                      ("gem", True)])
def test_masked_regional_equals_unpadded(pool, jit):
  maps = relu_maps(SIZES + [(13, 13)] if jit else SIZES[2:6])  # eager: slow dispatch
  x, mask = padded_batch(maps)
  fn = lambda a, m: pooling_ops.regional_pool(a, 3, pool, 3.0, mask=m)
  got = (jax.jit(fn) if jit else fn)(x, mask)
  for i, m in enumerate(maps):
    ref = np_regional(m.astype(np.float64), 3, NP_POOLS[pool])
    np.testing.assert_allclose(got[i], ref, rtol=2e-5, atol=2e-6, err_msg=str(m.shape))
  if pool == "gem":  # and the unmasked static path on one of them
    np.testing.assert_allclose(fn(jnp.asarray(maps[3][None]), None)[0], got[3], rtol=2e-5)


def test_masked_rmac_gradients_are_finite():
  maps = relu_maps([(3, 5), (5, 3)], c=2)
  x, mask = padded_batch(maps)
  g = jax.jit(jax.grad(lambda a: jnp.sum(pooling_ops.rmac(a, 2, mask=mask) * jnp.arange(2.0))))(x)
  assert np.all(np.isfinite(g))
  assert float(jnp.abs(jnp.where(mask[..., None], 0.0, g)).max()) == 0.0  # no grad to padding


# ----------------------------------------------------------------------------------------------
# Seddati et al.


def test_seddati_vs_numpy():
  for h, w in [(6, 9), (10, 10), (3, 14), (1, 4)]:
    x = relu_maps([(h, w)])[0]
    np.testing.assert_allclose(pooling_ops.seddati_rmac(x[None])[0], np_seddati(x), rtol=1e-5)


def test_seddati_kernels():
  # min side 20: k = ceil(40/2)=20, ceil(40/3)=14, ceil(40/4)=10; s = floor(0.4 k).
  assert pooling_ops.seddati_kernels(20, 30) == [(20, 8), (14, 5), (10, 4)]
  assert pooling_ops.seddati_kernels(1, 5) == [(1, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize("jit", [False, True])
def test_masked_seddati_equals_unpadded(jit):
  maps = relu_maps(SIZES + [(13, 13)])
  x, mask = padded_batch(maps)
  fn = lambda a, m: pooling_ops.seddati_rmac(a, 3, mask=m)
  got = (jax.jit(fn) if jit else fn)(x, mask)
  for i, m in enumerate(maps):
    np.testing.assert_allclose(got[i], np_seddati(m), rtol=2e-5, atol=1e-6, err_msg=str(m.shape))


# ----------------------------------------------------------------------------------------------
# NetVLAD and multi-scale NetVLAD.


def _codebook(k=4, c=5):
  cent = RNG.standard_normal((k, c))
  return (cent / np.linalg.norm(cent, axis=1, keepdims=True) * 0.8).astype(np.float32)


def test_netvlad_vs_numpy():
  x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
  cent = _codebook()
  got = netvlad.netvlad(x, cent, alpha=7.0)
  assert got.shape == (2, 4 * 5)
  for b in range(2):
    ref = np_vlad(list(x[b].reshape(-1, 5)), cent.astype(np.float64), 7.0)
    np.testing.assert_allclose(got[b], ref, rtol=1e-4, atol=1e-6)
  # Decoupled form initialised from the codebook equals the tied one.
  prm = netvlad.netvlad_params(cent, 7.0, decoupled=True)
  np.testing.assert_allclose(
      netvlad.netvlad(x, cent, 0.0, assign_kernel=prm["assign_kernel"],
                      assign_bias=prm["assign_bias"]), got, rtol=1e-5, atol=1e-6)


def test_multiscale_netvlad_vs_numpy():
  x = RNG.standard_normal((1, 4, 5, 5)).astype(np.float32)
  cent = _codebook()
  desc, valid = netvlad.multiscale_column_features(x, (2, 3))
  assert desc.shape == (1, 3 * 4 + 2 * 3, 5) and valid is None
  ref = np_vlad(np_columns(x[0], (2, 3)), cent.astype(np.float64), 5.0)
  np.testing.assert_allclose(netvlad.multiscale_netvlad(x, cent, 5.0)[0], ref, rtol=1e-4,
                             atol=1e-6)


def test_masked_netvlads_equal_unpadded():
  maps = [RNG.standard_normal((h, w, 5)).astype(np.float32) for h, w in SIZES if min(h, w) >= 2]
  x, mask = padded_batch(maps)
  cent = _codebook()
  fns = {"netvlad": lambda a, m: netvlad.netvlad(a, cent, 6.0, mask=m),
         "ms_netvlad": lambda a, m: netvlad.multiscale_netvlad(a, cent, 6.0, (2, 3), mask=m)}
  windows = {"netvlad": (1,), "ms_netvlad": (2, 3)}
  for name, fn in fns.items():
    got = jax.jit(fn)(x, mask)
    for i, m in enumerate(maps):
      ref = np_vlad(np_columns(m, windows[name]), cent.astype(np.float64), 6.0)
      np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=1e-6, err_msg=f"{name} {m.shape}")


def test_kmeans_init():
  # Three well separated directions: k-means finds them and alpha is positive and finite.
  dirs = np.eye(6)[:3] * 5
  desc = np.concatenate([d + 0.1 * RNG.standard_normal((40, 6)) for d in dirs])
  cent, alpha = clustering.kmeans_init(desc, 3, seed=1)
  assert cent.shape == (3, 6) and cent.dtype == np.float32
  assert np.isfinite(alpha) and alpha > 0
  # Each true direction has a centroid close to it (descriptors are normalised first).
  for d in np.eye(6)[:3]:
    assert np.min(np.linalg.norm(cent - d, axis=1)) < 0.1
  # alpha as documented: second-nearest centroid gets ~1% of the weight on average.
  x = desc / np.linalg.norm(desc, axis=1, keepdims=True)
  d2 = np.sort(((x[:, None] - cent[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_allclose(alpha, -np.log(0.01) / np.mean(d2[:, 1] - d2[:, 0]), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Modules and registry.


def test_gem_module_params():
  x = jnp.asarray(RNG.random((2, 3, 3, 4)), jnp.float32)
  for per_channel, shape in [(False, (1,)), (True, (4,))]:
    mod = pooling.GeM(p_init=2.0, per_channel=per_channel)
    variables = mod.init(jax.random.PRNGKey(0), x)
    assert variables["params"]["p"].shape == shape
    np.testing.assert_allclose(mod.apply(variables, x), pooling_ops.gem(x, 2.0), rtol=1e-6)
  fixed = pooling.GeM(p_init=3.0, trainable=False)
  assert not fixed.init(jax.random.PRNGKey(0), x)


def test_registry_and_modules():
  x = jnp.asarray(RNG.random((2, 6, 7, 5)), jnp.float32)
  mask = jnp.ones((2, 6, 7), bool).at[1, 4:].set(False)
  cent = _codebook(3, 5)
  dims = {"mac": 5, "spoc": 5, "gem": 5, "rmac": 5, "regional": 5, "seddati": 5,
          "seddati_cam": 5, "netvlad": 15, "ms_netvlad": 15}
  # The ViT class-token poolings (`cls`, `cls_gem`) take the token too: tests/test_vit.py.
  assert set(dims) | set(pooling.TOKEN_POOLINGS) == set(pooling.POOLINGS)
  for name, dim in dims.items():
    kwargs = {"num_clusters": 3} if "netvlad" in name else {}
    mod = pooling.build_pooling(name, name="pool", **kwargs)
    # Shapes only (no compilation); values are checked function by function above.
    variables = jax.eval_shape(mod.init, jax.random.PRNGKey(0), x, mask)
    out = jax.eval_shape(mod.apply, variables, x, mask)
    assert out.shape == (2, dim) and out.dtype == jnp.float32, name
  with pytest.raises(ValueError, match="valid"):
    pooling.build_pooling("avg")
  # Codebook initialisation.
  mod = pooling.NetVLAD(num_clusters=3, alpha=4.0, centroids_init=cent)
  variables = mod.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(variables["params"]["centroids"], cent)
  np.testing.assert_allclose(mod.apply(variables, x), netvlad.netvlad(x, cent, 4.0), rtol=1e-6)
  dec = pooling.MultiScaleNetVLAD(num_clusters=3, alpha=4.0, centroids_init=cent, decoupled=True)
  variables = dec.init(jax.random.PRNGKey(0), x)
  assert set(variables["params"]) == {"centroids", "assign_kernel", "assign_bias"}
  np.testing.assert_allclose(dec.apply(variables, x), netvlad.multiscale_netvlad(x, cent, 4.0),
                             rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError):
    pooling.NetVLAD(num_clusters=4, centroids_init=cent).init(jax.random.PRNGKey(0), x)


def test_normalize_of_a_zero_vector_has_a_finite_gradient():
  """An empty NetVLAD cluster has a zero residual; its gradient must not be NaN."""
  g = jax.grad(lambda x: pooling_ops.normalize(x).sum())(jnp.zeros((3,)))
  assert np.isfinite(np.asarray(g)).all()
