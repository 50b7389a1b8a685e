"""numpy transcription of Detect-to-Retrieve's aggregation, for the tests only.

Line by line after tensorflow/models research/delf/delf/python/
`feature_aggregation_extractor.py` (ExtractAggregatedRepresentation: the TF graph's
_ComputeVlad / _ComputeRvlad / _PerCentroidNormalization / _ComputeAsmk / _ComputeRasmk and
Extract's ASMK* packbits), `feature_aggregation_similarity.py`
(SimilarityAggregatedRepresentation) and `detect_to_retrieve/boxes_and_features_extraction.py`
(box selection and PIL crop). Loops are kept where the reference loops (tf.while_loop over
features / regions, the merge over sorted visual words), so that nothing here shares code
or vectorisation with `retrieval_jax.local.aggregation`.
"""
import math

import numpy as np

VLAD, ASMK, ASMK_STAR = 1, 2, 3
_NORM_SQUARED_TOLERANCE = 1e-12


def _l2_normalize(x, axis=None):
  """tf.math.l2_normalize(x, axis, epsilon): x * rsqrt(max(sum(x**2), epsilon))."""
  square_sum = np.sum(np.square(x), axis=axis, keepdims=axis is not None)
  return x / np.sqrt(np.maximum(square_sum, _NORM_SQUARED_TOLERANCE))


class Config:
  """aggregation_config.proto's fields with its defaults."""

  def __init__(self, codebook_size=65536, feature_dimensionality=128,
               aggregation_type=ASMK_STAR, use_l2_normalization=True, num_assignments=1,
               use_regional_aggregation=False, feature_batch_size=100, alpha=3.0, tau=0.0):
    self.codebook_size = codebook_size
    self.feature_dimensionality = feature_dimensionality
    self.aggregation_type = aggregation_type
    self.use_l2_normalization = use_l2_normalization
    self.num_assignments = num_assignments
    self.use_regional_aggregation = use_regional_aggregation
    self.feature_batch_size = feature_batch_size
    self.alpha = alpha
    self.tau = tau


class Extractor:
  """ExtractAggregatedRepresentation with the codebook given as an array."""

  def __init__(self, config, codebook):
    self.c = config
    self.codebook = np.asarray(codebook, np.float32)
    self.K, self.D = self.c.codebook_size, self.c.feature_dimensionality

  def extract(self, features, num_features_per_region=None):
    features = np.asarray(features, np.float32)
    if num_features_per_region is None:
      num_features_per_region = []
    elif len(num_features_per_region) and sum(num_features_per_region) != features.shape[0]:
      raise ValueError("Incorrect arguments")
    if self.c.aggregation_type == VLAD:
      words = np.int32(-1)
      if self.c.use_regional_aggregation:
        desc = self._rvlad(features, num_features_per_region, self.c.use_l2_normalization,
                           self.c.num_assignments)
      else:
        desc = self._vlad(features, self.c.use_l2_normalization, self.c.num_assignments)
    elif self.c.aggregation_type in (ASMK, ASMK_STAR):
      if self.c.use_regional_aggregation:
        desc, words = self._rasmk(features, num_features_per_region, self.c.num_assignments)
      else:
        desc, words = self._asmk(features, self.c.num_assignments)
    else:
      raise ValueError("Invalid aggregation type")
    if self.c.aggregation_type == ASMK_STAR:
      reshaped = np.reshape(desc, [-1, self.D])
      desc = np.reshape(np.packbits(reshaped > 0, axis=1), [-1])
    return desc, words

  def _nearest_words(self, features, num_assignments):
    """The while_loop over feature batches: tile, squared_difference, argsort, slice."""
    n = features.shape[0]
    batch = n if self.c.feature_batch_size <= 0 else self.c.feature_batch_size
    selected = np.zeros([0, num_assignments], np.int32)
    ind = 0
    while ind < n:
      b = n - ind if ind + batch > n else batch
      tiled_features = np.reshape(np.tile(features[ind:ind + b], [1, self.K]), [-1, self.D])
      tiled_codebook = np.reshape(np.tile(np.reshape(self.codebook, [1, -1]), [b, 1]),
                                  [-1, self.D])
      squared = np.reshape(np.sum((tiled_features - tiled_codebook) ** 2, axis=1),
                           [b, self.K])
      nearest = np.argsort(squared, axis=1, kind="stable")
      selected = np.concatenate([selected, nearest[:, :num_assignments]], axis=0)
      ind += b
    return selected

  def _vlad(self, features, use_l2_normalization=True, num_assignments=1):
    if features.size == 0:
      return np.zeros([self.K * self.D], np.float32)
    words = self._nearest_words(features, num_assignments)
    vlad = np.zeros([self.K, self.D], np.float32)
    for ind in range(features.shape[0]):  # tensor_scatter_nd_add, one feature at a time
      residuals = np.tile(features[ind][None], [num_assignments, 1]) - self.codebook[words[ind]]
      for a in range(num_assignments):
        vlad[words[ind, a]] += residuals[a]
    vlad = np.reshape(vlad, [self.K * self.D])
    if use_l2_normalization:
      vlad = _l2_normalize(vlad)
    return vlad

  def _rvlad(self, features, num_features_per_region, use_l2_normalization=False,
             num_assignments=1):
    if np.size(num_features_per_region) == 0:
      return np.zeros([self.K * self.D], np.float32)
    rvlad = np.zeros([self.K * self.D], np.float32)
    num_regions = len(num_features_per_region)
    for ind in range(num_regions):
      start = int(np.sum(num_features_per_region[:ind]))
      region = features[start:start + num_features_per_region[ind]]
      # _ComputeVlad with its default use_l2_normalization=True, per region.
      rvlad = rvlad + self._vlad(region, num_assignments=num_assignments)
    if use_l2_normalization:
      rvlad = _l2_normalize(rvlad)
    else:
      rvlad = rvlad / np.float32(num_regions)
    return rvlad

  def _per_centroid_normalization(self, unnormalized):
    unnormalized = np.reshape(unnormalized, [self.K, self.D])
    norms = np.linalg.norm(unnormalized, axis=1)
    visual_words = np.reshape(np.argwhere(norms > math.sqrt(_NORM_SQUARED_TOLERANCE)), [-1])
    return _l2_normalize(unnormalized, axis=1), visual_words

  def _asmk(self, features, num_assignments=1):
    unnormalized = self._vlad(features, use_l2_normalization=False,
                              num_assignments=num_assignments)
    normalized, words = self._per_centroid_normalization(unnormalized)
    return np.reshape(normalized[words], [len(words) * self.D]), words

  def _rasmk(self, features, num_features_per_region, num_assignments=1):
    unnormalized = self._rvlad(features, num_features_per_region, use_l2_normalization=False,
                               num_assignments=num_assignments)
    normalized, words = self._per_centroid_normalization(unnormalized)
    return np.reshape(normalized[words], [len(words) * self.D]), words


class Similarity:
  """SimilarityAggregatedRepresentation."""

  def __init__(self, config):
    self.D = config.feature_dimensionality
    self.type = config.aggregation_type
    self.use_l2_normalization = config.use_l2_normalization
    self.alpha = config.alpha
    self.tau = config.tau
    self.number_bits = np.array([bin(n).count("1") for n in range(256)])

  def compute(self, d1, d2, w1=None, w2=None):
    if self.type == VLAD:
      return np.dot(d1, d2)
    if self.type == ASMK:
      return self._asmk(d1, d2, w1, w2, binarized=False)
    if self.type == ASMK_STAR:
      return self._asmk(d1, d2, w1, w2, binarized=True)
    raise ValueError("Invalid aggregation type")

  def _sigma(self, x):
    if x > self.tau:
      return np.sign(x) * np.power(np.absolute(x), self.alpha)
    return 0.0

  def _binary_inner_product(self, d1, d2):
    h = 0
    for i in range(len(d1)):
      h += self.number_bits[np.bitwise_xor(d1[i], d2[i])]
    bits_per_descriptor = min(self.D, 8)
    return 1.0 - 2.0 * h / (bits_per_descriptor * len(d1))

  def _asmk(self, d1, d2, w1, w2, binarized):
    n1, n2 = len(w1), len(w2)
    if not n1 or not n2:
      return -1.0
    if binarized:
      assert d1.dtype == np.uint8 and d2.dtype == np.uint8
      per_word = int(len(d1) / n1)
    else:
      per_word = self.D
    r1 = np.reshape(d1, [n1, per_word])
    r2 = np.reshape(d2, [n2, per_word])
    total, i1, i2 = 0.0, 0, 0
    while i1 < n1 and i2 < n2:
      if w1[i1] == w2[i2]:
        if binarized:
          ip = self._binary_inner_product(r1[i1], r2[i2])
        else:
          ip = np.dot(r1[i1], r2[i2])
        total += self._sigma(ip)
        i1 += 1
        i2 += 1
      elif w1[i1] > w2[i2]:
        i2 += 1
      else:
        i1 += 1
    if self.use_l2_normalization:
      total /= np.sqrt(n1 * n2)
    return total


def selected_boxes(boxes, scores, threshold):
  """boxes_and_features_extraction: the boxes with score >= detector_thresh, in order."""
  return [box for i, box in enumerate(boxes) if scores[i] >= threshold]


def pil_crop_box(box, width, height):
  """boxes_and_features_extraction: [ymin, xmin, ymax, xmax] in [0, 1] -> PIL's crop box."""
  return [int(math.floor(box[1] * width)), int(math.floor(box[0] * height)),
          int(math.ceil(box[3] * width)), int(math.ceil(box[2] * height))]
