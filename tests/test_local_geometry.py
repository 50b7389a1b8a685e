"""Receptive fields of every trunk's local stage, and keypoint positions derived from them.

Three independent checks:
* the numbers against a hand derivation (comments below, layer by layer);
* the numbers against the pixels that really influence a stage position of each (tiny)
  trunk: with all weights positive, every path of the network carries signal, so the
  pixels with a non-zero gradient (ReLU6 trunks) or the positions changed by a huge
  perturbation of one pixel (max-pool trunks, where a gradient follows only the argmax)
  are exactly the receptive boxes;
* extracted keypoints sit at the receptive-box centres of the positions they come from.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.local import keypoints as kp_lib
from retrieval_jax.local import model as model_lib
from retrieval_jax.local import receptive_field as rf_lib
from retrieval_jax.models import backbones

# Hand derivations: rf += (k - 1) * jump, jump *= s, start -= pad * jump.
HAND = {
    # conv7/2 pad3: rf 7 j2 start -3; maxpool3/2 pad1: rf 11 j4 start -5;
    # layer1 2 blocks x two 3x3 at j4: +32 -> 43, start -21; layer2: 3x3/2 at j4 +8 -> 51
    # (j8, start -25), 3 more 3x3 at j8: +48 -> 99 (start -49); layer3: 3x3/2 at j8 +16 ->
    # 115 (j16, start -57), 3 more at j16: +96 -> 211, start -105.
    ("resnet18", None): (211, 16, 105),
    # v1.5 bottleneck (stride in the 3x3): stem+pool 11 (j4, -5); layer1 3x(3x3 at j4) ->
    # 35 (-17); layer2 first 3x3/2 at j4 -> 43 (j8, -21), 3 more at j8 -> 91 (-45); layer3
    # first 3x3/2 at j8 -> 107 (j16, -53), 5 more at j16 -> 267 (-133).
    ("resnet50", None): (267, 16, 133),
    # Tiny variant used below: stages (1, 1, 1, 1): 11 -> 19 (-9) -> 27 (j8, -13) ->
    # 43 (j16, -21).
    ("resnet50", (1, 1, 1, 1)): (43, 16, 21),
    # stem 3x3/2 -> 3 (j2, -1); block1 dw at j2 -> 7 (-3); block2 dw/2 at j2 -> 11 (j4, -5);
    # block3 at j4 -> 19 (-9); block4 /2 at j4 -> 27 (j8, -13); blocks 5,6 at j8 -> 59 (-29);
    # block7 /2 at j8 -> 75 (j16, -37); blocks 8..13 at j16 -> 267 (-133).
    ("mobilenet_v2", None): (267, 16, 133),
    # TF SAME, pads before (k - s) // 2: stem 3/2 pad 0 -> 3 (j2, 0); b0 3x3 pad 1 -> 7
    # (-2); b1 3/2 pad 0 -> 11 (j4, -2); b2 3x3 -> 19 (-6); b3 5/2 pad 1 -> 35 (j8, -10);
    # b4 5x5 pad 2 -> 67 (-26); b5 3/2 pad 0 -> 83 (j16, -26); b6, b7 3x3 -> 147 (-58);
    # b8..b10 5x5 pad 2 -> 339 (-154).
    ("efficientnet_lite0", None): (339, 16, 154),
    # conv1_x: 5 (-2); pool 2/2: 6 (j2, -2); conv2_x: 14 (-6); pool: 16 (j4); conv3_x: 40
    # (-18); pool: 44 (j8); conv4_x: 92 (-42).
    ("vgg16", None): (92, 8, 42),
}


@pytest.mark.parametrize("key", sorted(HAND, key=str))
def test_receptive_field_hand_computed(key):
  backbone, stages = key
  kwargs = {} if stages is None else {"stage_sizes": stages}
  got = rf_lib.receptive_field(backbone, kwargs)
  assert (got.size, got.stride, got.padding) == HAND[key]


def test_receptive_field_errors():
  with pytest.raises(ValueError, match="unknown receptive-field chain"):
    rf_lib.receptive_field("resnet7")
  with pytest.raises(ValueError, match="stage"):
    rf_lib.receptive_field("resnet50", stage=0)


def _positive_variables(shapes):
  """Every weight positive and normalised by its fan-in, BN the identity plus a small shift.

  `shapes`: the variables' ShapeDtypeStructs (jax.eval_shape of init): nothing random is
  needed, so no initialiser runs.
  """
  def fix(path, x):
    name = path[-1].key
    if name == "kernel":
      return jnp.full(x.shape, 1.0 / np.prod(x.shape[:-1]), x.dtype)
    if name in ("bias",):
      return jnp.full(x.shape, 1e-3, x.dtype)
    if name in ("scale", "var"):
      return jnp.ones_like(x)
    if name == "mean":
      return jnp.zeros_like(x)
    raise ValueError(f"unexpected variable {path}")
  return jax.tree_util.tree_map_with_path(fix, shapes)


def _trunk(backbone, kwargs):
  return backbones.get_backbone(backbone).make(**kwargs)


# (backbone, kwargs, image side, method, probe): "grad" probes the pixels influencing
# stage position `probe`; "perturb" probes the stage positions influenced by pixel `probe`.
INFLUENCE_CASES = [
    ("mobilenet_v2", {"width_mult": 0.25}, 320, "grad", (9, 10)),
    ("efficientnet_lite0", {}, 384, "grad", (10, 11)),
    ("resnet18", {"width": 4}, 288, "perturb", (150, 141)),
    ("resnet50", {"width": 2}, 320, "perturb", (150, 163)),
    ("vgg16", {"width": 4}, 160, "perturb", (70, 77)),
]


@pytest.mark.parametrize("backbone,kwargs,side,method,probe", INFLUENCE_CASES,
                         ids=[c[0] for c in INFLUENCE_CASES])
def test_receptive_field_equals_measured_influence(backbone, kwargs, side, method, probe):
  trunk = _trunk(backbone, kwargs)
  x0 = jnp.full((1, side, side, 3), 1e-4 if method == "grad" else 1.0, jnp.float32)
  variables = _positive_variables(jax.eval_shape(trunk.init, jax.random.PRNGKey(0),
                                                 x0[:, :64, :64]))
  rf = rf_lib.receptive_field(backbone, kwargs)

  # The variables go in as an argument: closed over, XLA folds these constant weights
  # into a wrong result (seen on CPU, jax 0.10).
  apply = jax.jit(lambda v, x: trunk.apply(v, x)["stages"][-2][0])  # [h, w, C]

  def stage(x):
    return apply(variables, x)

  if method == "grad":
    i, j = probe
    g = jax.jit(jax.grad(lambda x, v: jnp.sum(trunk.apply(v, x)["stages"][-2][0, i, j])))(
        x0, variables)[0].sum(-1)
    rows, cols = np.nonzero(np.asarray(g) != 0)
    y0, x0_ = i * rf.stride - rf.padding, j * rf.stride - rf.padding
    # The probe's whole box lies inside the image, so it is seen exactly.
    assert 0 <= y0 and y0 + rf.size <= side and 0 <= x0_ and x0_ + rf.size <= side
    assert (rows.min(), rows.max()) == (y0, y0 + rf.size - 1)
    assert (cols.min(), cols.max()) == (x0_, x0_ + rf.size - 1)
  else:
    py, px = probe
    base = np.asarray(stage(x0))
    hit = np.asarray(stage(x0.at[0, py, px, :].add(1e20)))
    changed = np.abs(hit - base).max(-1) > 1e-3 * (np.abs(base).max(-1) + 1.0)
    h, w = changed.shape
    boxes = rf_lib.receptive_boxes(h, w, rf).reshape(h, w, 4)
    expected = ((boxes[..., 0] <= py) & (py <= boxes[..., 2])
                & (boxes[..., 1] <= px) & (px <= boxes[..., 3]))
    rows = np.nonzero(expected.any(1))[0]
    cols = np.nonzero(expected.any(0))[0]
    # Both ends of the influenced range are inside the map: size and offset are tested.
    assert rows.min() > 0 and rows.max() < h - 1 and cols.min() > 0 and cols.max() < w - 1
    np.testing.assert_array_equal(changed, expected)


@pytest.mark.parametrize("backbone,kwargs", [("resnet18", {"width": 4,
                                                           "stage_sizes": (1, 1, 1, 1)}),
                                              ("vgg16", {"width": 4})])
def test_keypoints_at_receptive_centres(backbone, kwargs):
  """Keypoints of scale s sit at (i * stride + centre offset) / s for integer positions i."""
  model = model_lib.DelfNet(backbone=backbone, backbone_kwargs=kwargs, reduced_dim=8,
                            attention_hidden=8)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (1, 128, 160, 3), np.uint8)
  masks = np.ones((1, 128, 160), bool)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, masks)
  rf = model_lib.local_receptive_field(model)  # the stage subsampled to stride 2 * 16 / 2 * 8
  assert rf.stride == 2 * rf_lib.receptive_field(backbone, kwargs).stride
  select = kp_lib.make_select_fn(model, None, 6)
  for scale in (1.0, 0.5):
    rec = kp_lib.keypoints_of_batch(select, variables, images, masks, rf=rf, scales=(scale,),
                                    score_threshold=-1.0, max_features=6)[0]
    assert len(rec["scores"]) == 6
    grid = (rec["locations"] * scale - rf.center_offset) / rf.stride
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)
    np.testing.assert_allclose(rec["scales"], 1.0 / scale)
    assert np.all(np.diff(rec["scores"]) <= 0)
    np.testing.assert_allclose(np.linalg.norm(rec["descriptors"], axis=1), 1.0, rtol=1e-5)
