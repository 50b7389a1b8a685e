"""Classic benchmarks: Oxford5k / Paris6k (original protocol), INRIA Holidays, UKBench, GLDv2.

* Oxford5k / Paris6k (Philbin et al.): positives are the 'good' and 'ok' images, 'junk'
  images are removed from the ranking; the AP is the same trapezoidal AP as the official
  `compute_ap.cpp`, i.e. `revisited.compute_ap`. The (cropped) query image is itself in the
  database and in its own 'good'/'ok' list, as in the original protocol.
* INRIA Holidays (Jegou et al., `eval_holidays.py`): images `XXXXYY.jpg`, group
  `number // 100`; the image with `number % 100 == 0` is the query of its group, its
  positives the other images of the group; the query is dropped from its own ranking
  (the official `rank_shift`), every image of the dataset is in the database.
* UKBench (Nister & Stewenius): groups of 4 consecutive images; every image queries the
  whole set; the N-S score is the mean number of its group (itself included) in the top 4.
* GLDv2 (Weyand et al., CVPR 2020): `MeanAveragePrecision` (retrieval mAP@100) and
  `GlobalAveragePrecision` (recognition GAP), transcribed from
  `delf/python/datasets/google_landmarks_dataset/metrics.py` with the same dict inputs.
"""
import collections
import os
import re
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from retrieval_jax.evaluation import revisited

_GT_FILE = re.compile(r'^(?P<landmark>.+)_(?P<n>\d+)_query\.txt$')


# --------------------------------------------------------------------------------------
# Oxford5k / Paris6k
# --------------------------------------------------------------------------------------
def _read_names(path: str) -> List[str]:
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def read_classic_gt(
    gt_dir: str, imlist: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Reads the original `<landmark>_<n>_{query,good,ok,junk}.txt` ground-truth files.

  The query file holds one line `name x1 y1 x2 y2`; Oxford names carry an `oxc1_` prefix
  that is not part of the image file name and is stripped. Queries are ordered by
  (landmark, n), which is the order of the official `gnd_oxford5k.pkl` / `gnd_paris6k.pkl`.

  Args:
    gt_dir: folder holding the text files (e.g. `oxford5k_gt/`, `paris6k_gt/`).
    imlist: optional database image names (without `.jpg`); when given, the ground truth
      is returned as indices into it (names missing from `imlist` raise a KeyError).

  Returns:
    {'qimlist': [n_q] query names, 'bbx': [n_q, 4] float64 (x1, y1, x2, y2),
     'gnd': n_q dicts with 'ok' (good + ok), 'good', 'junk' and 'bbx' (list of 4 floats)}
    where the lists hold names, or int64 index arrays when `imlist` is given.
  """
  queries = []
  for fname in os.listdir(gt_dir):
    m = _GT_FILE.match(fname)
    if m:
      queries.append((m.group('landmark'), int(m.group('n'))))
  queries.sort()
  index = None if imlist is None else {name: i for i, name in enumerate(imlist)}

  def convert(names):
    if index is None:
      return list(names)
    return np.asarray([index[n] for n in names], dtype=np.int64)

  qimlist, bbxs, gnd = [], [], []
  for landmark, n in queries:
    prefix = os.path.join(gt_dir, f'{landmark}_{n}')
    fields = _read_names(prefix + '_query.txt')[0].split()
    name = fields[0]
    if name.startswith('oxc1_'):
      name = name[len('oxc1_'):]
    bbx = [float(v) for v in fields[1:5]]
    good = _read_names(prefix + '_good.txt')
    ok = _read_names(prefix + '_ok.txt')
    junk = _read_names(prefix + '_junk.txt')
    qimlist.append(name)
    bbxs.append(bbx)
    gnd.append({'ok': convert(good + ok), 'good': convert(good), 'junk': convert(junk),
                'bbx': bbx})
  return {'qimlist': qimlist, 'bbx': np.asarray(bbxs, dtype=np.float64).reshape(-1, 4),
          'gnd': gnd}


def evaluate_classic(dataset_name: str, ranks: np.ndarray,
                     gnd: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """Original Oxford5k / Paris6k mAP.

  Args:
    dataset_name: printed name, e.g. 'oxford5k'.
    ranks: [n_db, n_queries] rankings (revisitop convention).
    gnd: per-query dicts with 'ok' (good + ok indices) and 'junk' indices.

  Returns:
    {'mAP': percent rounded to 2 decimals, 'aps': [n_queries], 'lines': ['>> name: 81.23']}.
  """
  m, aps, _, _ = revisited.compute_map(ranks, gnd, kappas=())
  m = np.around(m * 100, decimals=2)
  return {'mAP': float(m), 'aps': aps, 'lines': ['>> {}: mAP {}'.format(dataset_name, m)]}


# --------------------------------------------------------------------------------------
# INRIA Holidays
# --------------------------------------------------------------------------------------
def holidays_gnd(image_names: Sequence[str]) -> Tuple[np.ndarray, List[Dict[str, np.ndarray]]]:
  """Queries and ground truth of INRIA Holidays from the image names.

  Args:
    image_names: [n_db] file names like '100000.jpg' (any path/extension is dropped).

  Returns:
    (query_indices [n_q] int64 indices into `image_names` of the images whose number is a
     multiple of 100, gnd: n_q dicts with 'ok' = the other images of the group and
     'junk' = the query itself, which drops it from its own ranking).
  """
  numbers = [int(os.path.splitext(os.path.basename(n))[0]) for n in image_names]
  groups = collections.defaultdict(list)
  for i, num in enumerate(numbers):
    groups[num // 100].append(i)
  query_indices, gnd = [], []
  for i, num in enumerate(numbers):
    if num % 100 == 0:
      others = [j for j in groups[num // 100] if j != i]
      query_indices.append(i)
      gnd.append({'ok': np.asarray(others, dtype=np.int64),
                  'junk': np.asarray([i], dtype=np.int64)})
  return np.asarray(query_indices, dtype=np.int64), gnd


def holidays_map(ranks: np.ndarray, image_names: Sequence[str]) -> float:
  """INRIA Holidays mAP in percent.

  Args:
    ranks: [n_db, n_q] rankings of the whole dataset for the queries of `holidays_gnd`
      (in that order: the images with number % 100 == 0, in `image_names` order).
    image_names: [n_db] database image names.

  Returns:
    mAP in percent.
  """
  _, gnd = holidays_gnd(image_names)
  if ranks.shape[1] != len(gnd):
    raise ValueError(f'ranks has {ranks.shape[1]} queries, Holidays names give {len(gnd)}.')
  return 100. * revisited.compute_map(ranks, gnd, kappas=())[0]


# --------------------------------------------------------------------------------------
# UKBench
# --------------------------------------------------------------------------------------
def ukbench_score(ranks: np.ndarray, group_size: int = 4) -> float:
  """UKBench N-S score: mean number of same-object images (itself included) in the top 4.

  Args:
    ranks: [n_db, n_db] rankings (column `i` for image `i` used as query), with the
      database in the dataset order, so that image `i` belongs to group `i // group_size`.
    group_size: images per object (4 in UKBench); also the length of the shortlist.

  Returns:
    The score in [0, group_size] (4.0 is perfect).
  """
  ranks = np.asarray(ranks)
  n = ranks.shape[1]
  top = ranks[:group_size, :]
  query_groups = np.arange(n) // group_size
  return float(np.mean(np.sum(top // group_size == query_groups[None, :], axis=0)))


# --------------------------------------------------------------------------------------
# GLDv2 (transcribed from delf's google_landmarks_dataset/metrics.py)
# --------------------------------------------------------------------------------------
def _count_positives(solution: Mapping[Hashable, Sequence[Any]]) -> int:
  """Number of test images with non-empty ground truth."""
  return sum(1 for v in solution.values() if len(v))


def global_average_precision(
    predictions: Mapping[Hashable, Mapping[str, Any]],
    recognition_solution: Mapping[Hashable, Sequence[Any]],
    ignore_non_gt_test_images: bool = False,
) -> float:
  """Recognition GAP (micro-AP over test images sorted by confidence).

  Args:
    predictions: test image id -> {'class': landmark id, 'score': float}; images without a
      prediction are simply absent.
    recognition_solution: test image id -> list of ground-truth landmark ids (empty for
      non-landmark images).
    ignore_non_gt_test_images: skip predictions on images without ground truth (False for
      the Kaggle challenge: such predictions count as wrong).

  Returns:
    GAP in [0, 1].
  """
  num_positives = _count_positives(recognition_solution)
  gap = 0.
  total_predictions = 0
  correct_predictions = 0
  # Kaggle's order: score descending, then key ascending, then class ascending (two stable
  # sorts).
  by_key_class = sorted(predictions.items(), key=lambda item: (item[0], item[1]['class']))
  ordered = sorted(by_key_class, key=lambda item: item[1]['score'], reverse=True)
  for key, prediction in ordered:
    if ignore_non_gt_test_images and not recognition_solution[key]:
      continue
    total_predictions += 1
    if prediction['class'] in recognition_solution[key]:
      correct_predictions += 1
      gap += correct_predictions / total_predictions
  gap /= num_positives
  return gap


def mean_average_precision(
    predictions: Mapping[Hashable, Sequence[Hashable]],
    retrieval_solution: Mapping[Hashable, Sequence[Hashable]],
    max_predictions: int = 100,
) -> float:
  """Retrieval mAP@max_predictions of the Google Landmark Retrieval challenge.

  Args:
    predictions: test image id -> ranked list of index image ids.
    retrieval_solution: test image id -> list of relevant index image ids (non-empty).
      Queries in the solution but not in `predictions` count as AP 0.
    max_predictions: shortlist length (100 for the challenge).

  Returns:
    mAP in [0, 1].

  Raises:
    ValueError: if a predicted test image is not in `retrieval_solution`.
  """
  num_test_images = len(retrieval_solution.keys())
  mean_ap = 0.
  for key, prediction in predictions.items():
    if key not in retrieval_solution:
      raise ValueError('Test image %s is not part of retrieval_solution' % key)
    # Duplicated predictions are skipped but still take a rank.
    ap = 0.
    already_predicted = set()
    num_expected_retrieved = min(len(retrieval_solution[key]), max_predictions)
    num_correct = 0
    for i in range(min(len(prediction), max_predictions)):
      if prediction[i] not in already_predicted:
        if prediction[i] in retrieval_solution[key]:
          num_correct += 1
          ap += num_correct / (i + 1)
        already_predicted.add(prediction[i])
    ap /= num_expected_retrieved
    mean_ap += ap
  mean_ap /= num_test_images
  return mean_ap


def gldv2_retrieval_map(topk_indices: np.ndarray, positives: Sequence[Sequence[int]],
                        max_predictions: int = 100) -> float:
  """`mean_average_precision` for array inputs.

  Args:
    topk_indices: [n_q, K] database indices, best first.
    positives: n_q lists of relevant database indices. Queries with an empty list are not
      part of the solution (as the challenge's ignored queries) and are dropped.
    max_predictions: shortlist length.

  Returns:
    mAP@max_predictions in [0, 1].
  """
  predictions, solution = {}, {}
  for q, pos in enumerate(positives):
    if len(pos):
      solution[q] = [int(p) for p in pos]
      predictions[q] = [int(p) for p in topk_indices[q]]
  return mean_average_precision(predictions, solution, max_predictions)


def gldv2_recognition_gap(pred_labels: np.ndarray, pred_scores: np.ndarray,
                          true_labels: Sequence[Sequence[int]]) -> float:
  """`global_average_precision` for array inputs (one prediction per test image).

  Args:
    pred_labels: [n_q] predicted landmark ids.
    pred_scores: [n_q] confidences.
    true_labels: n_q lists of ground-truth landmark ids (empty for non-landmarks).

  Returns:
    GAP in [0, 1].
  """
  predictions = {q: {'class': int(pred_labels[q]), 'score': float(pred_scores[q])}
                 for q in range(len(pred_labels))}
  solution = {q: [int(t) for t in true_labels[q]] for q in range(len(true_labels))}
  return global_average_precision(predictions, solution)
