"""DELF/DELG heads and keypoint extraction: numpy re-derivations, masks, stop-gradient, NMS."""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from retrieval_jax import sharding
from retrieval_jax.local import extract as local_extract
from retrieval_jax.local import heads
from retrieval_jax.local import keypoints as kp_lib
from retrieval_jax.local import model as model_lib
from retrieval_jax.models import retrieval_net

TINY = {"width": 4, "stage_sizes": (1, 1, 1, 1)}


def _np_l2n(x):
  return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def test_head_matches_numpy_reference():
  """Attention, pooling, autoencoder and both loss terms against delf_model.py / train.py."""
  rng = np.random.default_rng(0)
  stage = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  mask = np.ones((2, 3, 4), bool)
  mask[1, 2:, :] = False
  mask[1, :, 3:] = False
  labels = np.array([1, 4])
  head = heads.LocalHead(num_classes=5, reduced_dim=3, attention_hidden=7)
  variables = head.init(jax.random.PRNGKey(1), stage, mask)
  bn_stats = {"mean": rng.normal(size=7).astype(np.float32),
              "var": rng.uniform(0.5, 2.0, 7).astype(np.float32)}
  variables = {**variables, "batch_stats": {"attention": {"bn_conv1": bn_stats}}}
  out = head.apply(variables, stage, mask)
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  bn = p["attention"]["bn_conv1"]

  def conv(x, layer):
    return x @ layer["kernel"][0, 0] + layer["bias"]

  reduced = conv(stage, p["autoencoder"]["conv1"])
  expanded = np.maximum(conv(reduced, p["autoencoder"]["conv2"]), 0)
  hidden = conv(expanded, p["attention"]["conv1"])
  hidden = (hidden - bn_stats["mean"]) / np.sqrt(bn_stats["var"] + 1e-3) * bn["scale"]
  hidden = np.maximum(hidden + bn["bias"], 0)
  score = conv(hidden, p["attention"]["conv2"])[..., 0]
  prob = np.log1p(np.exp(score)) * mask
  np.testing.assert_allclose(out["attention"], prob, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["local_descriptors"], reduced, rtol=1e-5, atol=1e-6)
  pooled = np.stack([(_np_l2n(stage[b]) * prob[b][..., None])[mask[b]].mean(0)
                     for b in range(2)])
  logits = pooled @ p["attention_classifier"]["kernel"] + p["attention_classifier"]["bias"]
  np.testing.assert_allclose(out["attention_logits"], logits, rtol=1e-5, atol=1e-6)

  loss = heads.local_loss(out, jnp.asarray(stage), jnp.asarray(labels))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -logp[np.arange(2), labels].mean()
  recon = ((stage - expanded) ** 2).mean(-1)[mask].mean()
  np.testing.assert_allclose(loss["attention_loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(loss["reconstruction_loss"], recon, rtol=1e-5)
  np.testing.assert_allclose(loss["local_loss"], ce + 10.0 * recon, rtol=1e-5)


def test_local_loss_never_reaches_the_backbone():
  """DELG: the gradient of the local losses is stopped at the trunk; the head does learn."""
  model = model_lib.DelfNet(backbone="resnet18", backbone_kwargs=TINY, num_classes=3,
                            reduced_dim=4, attention_hidden=8)
  images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), np.uint8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)

  def loss_fn(params):
    out = model.apply({**variables, "params": params}, images)
    return heads.local_loss(out, out["stage"], jnp.array([0, 2]))["local_loss"]

  grads = jax.jit(jax.grad(loss_fn))(variables["params"])
  trunk = jax.tree_util.tree_leaves(grads["backbone"])
  head = jax.tree_util.tree_leaves(grads["local_head"])
  assert trunk and all(float(jnp.abs(g).max()) == 0.0 for g in trunk)
  assert all(float(jnp.abs(g).max()) > 0.0 for g in head)


def test_margin_classifier_and_bad_name():
  stage = jnp.ones((2, 2, 2, 4))
  head = heads.LocalHead(num_classes=3, reduced_dim=0, attention_hidden=4, classifier="arcface")
  v = head.init(jax.random.PRNGKey(0), stage, None, jnp.array([0, 1]))
  assert v["params"]["attention_classifier"]["kernel"].shape == (4, 3)
  with pytest.raises(ValueError, match="classifier must be one of"):
    heads.LocalHead(num_classes=3, classifier="svm").init(jax.random.PRNGKey(0), stage)
  with pytest.raises(ValueError, match="num_classes > 0"):
    heads.local_loss({"attention": stage[..., 0]}, stage, jnp.array([0, 1]))


def test_padded_batch_gives_the_unpadded_keypoints():
  """No keypoint from padding: an image padded into a larger bucket beside another image
  gives exactly its keypoints alone at its own size, at every pyramid scale."""
  model = model_lib.DelfNet(backbone="resnet18", backbone_kwargs=TINY, reduced_dim=8,
                            attention_hidden=8)
  rng = np.random.default_rng(0)
  small = rng.integers(0, 255, (80, 112, 3), np.uint8)
  other = rng.integers(0, 255, (128, 128, 3), np.uint8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), other[None])
  rf = model_lib.local_receptive_field(model)
  kw = dict(rf=rf, scales=(0.75, 1.0, 1.5), score_threshold=-1.0, max_features=30,
            iou_threshold=0.8)
  select = kp_lib.make_select_fn(model, None, 30)
  alone = kp_lib.keypoints_of_batch(select, variables, small[None],
                                    np.ones((1, 80, 112), bool), **kw)[0]
  batch = np.zeros((2, 128, 128, 3), np.uint8)
  masks = np.zeros((2, 128, 128), bool)
  batch[0, :80, :112], masks[0, :80, :112] = small, True
  batch[1], masks[1] = other, True
  batch[0, 80:, :] = 255  # padding content must not matter either
  padded = kp_lib.keypoints_of_batch(select, variables, batch, masks, **kw)[0]
  assert len(alone["scores"]) == 30
  for key in kp_lib.RECORD_KEYS:
    np.testing.assert_allclose(padded[key], alone[key], rtol=1e-5, atol=1e-5, err_msg=key)
  # Every keypoint's position is inside the valid part of its scale's feature map.
  for s in (0.75, 1.0, 1.5):
    loc = padded["locations"][padded["scales"] == 1 / s]
    pos = (loc * s - rf.center_offset) / rf.stride
    assert np.all(pos[:, 0] < np.ceil(round(80 * s) / rf.stride)) and np.all(
        pos[:, 1] < np.ceil(round(112 * s) / rf.stride))


def test_non_max_suppression_against_loop():
  """Greedy NMS equals a direct transcription of TF's (pairwise IoU, descending score)."""
  rng = np.random.default_rng(0)
  y, x = rng.uniform(0, 50, (2, 40))
  boxes = np.stack([y, x, y + 20, x + 20], axis=1)
  scores = rng.uniform(size=40)
  keep = kp_lib.non_max_suppression(boxes, scores, 0.3, 10)

  def iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

  expected = []
  for i in sorted(range(40), key=lambda i: -scores[i]):
    if all(iou(boxes[i], boxes[j]) <= 0.3 for j in expected):
      expected.append(i)
  assert list(keep) == expected[:10]
  np.testing.assert_array_equal(kp_lib.non_max_suppression(boxes, scores, 1.0, 5),
                                np.argsort(-scores)[:5])


def test_delg_global_branch_is_retrieval_net():
  """DelgNet's descriptor = RetrievalNet's on the same variables (its local head removed)."""
  kw = dict(backbone="resnet18", backbone_kwargs=TINY, pooling="gem", whitening_dim=16)
  delg = model_lib.DelgNet(num_classes=3, reduced_dim=4, attention_hidden=8, **kw)
  images = np.random.default_rng(0).integers(0, 255, (2, 64, 96, 3), np.uint8)
  mask = np.ones((2, 64, 96), bool)
  mask[1, 40:] = False
  variables = jax.jit(delg.init)(jax.random.PRNGKey(0), images, mask)
  out = jax.jit(delg.apply)(variables, images, mask)
  glob = {"params": {k: v for k, v in variables["params"].items() if k != "local_head"},
          "batch_stats": variables["batch_stats"]}
  ref = jax.jit(retrieval_net.RetrievalNet(**kw).apply)(glob, images, mask)
  np.testing.assert_allclose(out["descriptor"], ref["descriptor"], rtol=1e-5, atol=1e-6)
  assert out["attention_logits"].shape == (2, 3) and out["local_descriptors"].shape[-1] == 4


def test_extract_to_store_sharded_and_resumed(tmp_path):
  """Files -> store on the 8-device mesh; a lost chunk is redone on re-run, the rest kept;
  every record equals the one-image-at-a-time extraction."""
  rng = np.random.default_rng(0)
  paths = []
  for i, (h, w) in enumerate([(64, 96), (96, 64), (80, 80), (96, 96), (50, 70)]):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(paths[-1])
  model = model_lib.DelfNet(backbone="resnet18", backbone_kwargs=TINY, reduced_dim=8,
                            attention_hidden=8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.uint8))
  kw = dict(backbone="resnet18", backbone_kwargs=TINY, mesh=sharding.make_mesh(),
            long_side=96, scales=(1.0,), score_threshold=-1.0, max_features=12, batch_size=8,
            chunk_size=2)
  folder = str(tmp_path / "store")
  store = local_extract.extract_to_store(model, variables, paths, folder, **kw)
  first = [store[i] for i in range(5)]
  (tmp_path / "store" / "chunk-00001.npz").unlink()
  before = (tmp_path / "store" / "chunk-00000.npz").stat().st_mtime_ns
  store = local_extract.extract_to_store(model, variables, paths, folder, **kw)
  assert (tmp_path / "store" / "chunk-00000.npz").stat().st_mtime_ns == before
  rf = model_lib.local_receptive_field(model)
  select = kp_lib.make_select_fn(model, None, 12)
  for i, p in enumerate(paths):
    image = np.asarray(Image.open(p))
    ref = kp_lib.keypoints_of_batch(select, variables, image[None],
                                    np.ones((1,) + image.shape[:2], bool), rf=rf,
                                    score_threshold=-1.0, max_features=12)[0]
    for key in kp_lib.RECORD_KEYS:
      np.testing.assert_allclose(store[i][key], ref[key], rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(store[i][key], first[i][key])
