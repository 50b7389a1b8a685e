"""Tests for retrieval_jax.evaluation: metrics against hand values and real ground truth."""
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval_jax import evaluation
from retrieval_jax.evaluation import classic, pictures, revisited
from retrieval_jax.evaluation import query_expansion as rerank

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


def _ranks(*columns):
  """[n_db, n_q] ranks from per-query rankings (each a permutation of range(n_db))."""
  return np.stack([np.asarray(c) for c in columns], axis=1)


def _complete(prefix, n_db):
  """A full ranking starting with `prefix`, the rest in index order."""
  return list(prefix) + [i for i in range(n_db) if i not in prefix]


# --------------------------------------------------------------------------------------
# compute_ap / compute_map: hand-computed values
# --------------------------------------------------------------------------------------
def test_compute_ap_trapezoids():
  # Positives at 0-based positions 0 and 2, nres=2 (recall step 1/2):
  #   1st: left precision 1 (rank 0), right 1/1      -> (1 + 1) / 2 * 1/2     = 0.5
  #   2nd: left 1/2 (1 positive in 2), right 2/3     -> (1/2 + 2/3) / 2 * 1/2 = 7/24
  assert revisited.compute_ap(np.array([0, 2]), 2) == pytest.approx(19 / 24)
  # Only one of two positives retrieved, at position 1: (0 + 1/2) / 2 * 1/2 = 1/8.
  assert revisited.compute_ap(np.array([1]), 2) == pytest.approx(1 / 8)
  assert revisited.compute_ap(np.array([0, 1, 2]), 3) == pytest.approx(1.)


def test_compute_map_junk_in_front_is_removed():
  n = 6
  gnd = [{'ok': [0, 2], 'junk': []}, {'ok': [0, 2], 'junk': [3]}]
  # Query 0: no junk, positives at 0 and 2 -> 19/24 (see above).
  # Query 1: junk 3 ranked first; removing it moves positives from 1, 3 to 0, 2 -> 19/24.
  ranks = _ranks(_complete([0, 1, 2], n), _complete([3, 0, 1, 2], n))
  m, aps, _, _ = revisited.compute_map(ranks, gnd, kappas=())
  np.testing.assert_allclose(aps, [19 / 24, 19 / 24])
  assert m == pytest.approx(19 / 24)
  # Without the junk declaration the same ranking is worse: positives at 1, 3:
  #   (0/1 + 1/2) / 2 * 1/2 + (1/3 + 2/4) / 2 * 1/2 = 1/8 + 5/24 = 1/3.
  m2, _, _, _ = revisited.compute_map(ranks[:, 1:], [{'ok': [0, 2]}], kappas=())
  assert m2 == pytest.approx(1 / 3)


def test_compute_map_junk_between_positives():
  n = 6
  # Ranking 1, 0, 5, 2 with junk 5: positives 0, 2 at 1, 3 -> after removal 1, 2:
  #   1st: (0/1 + 1/2) / 2 * 1/2 = 1/8;  2nd: (1/2 + 2/3) / 2 * 1/2 = 7/24;  AP = 5/12.
  ranks = _ranks(_complete([1, 0, 5, 2], n))
  m, aps, _, _ = revisited.compute_map(ranks, [{'ok': [0, 2], 'junk': [5]}], kappas=())
  assert m == pytest.approx(5 / 12)
  # Junk 5 between two positives at the top: 0, 5, 2 -> 0, 2 adjacent -> AP 1.
  ranks = _ranks(_complete([0, 5, 2], n))
  m, _, _, _ = revisited.compute_map(ranks, [{'ok': [0, 2], 'junk': [5]}], kappas=())
  assert m == pytest.approx(1.)


def test_compute_map_skips_queries_without_positives():
  n = 5
  ranks = _ranks(_complete([0], n), _complete([4], n), _complete([1, 2], n))
  gnd = [{'ok': [0], 'junk': []}, {'ok': [], 'junk': [1]}, {'ok': [2], 'junk': []}]
  m, aps, pr, prs = revisited.compute_map(ranks, gnd, kappas=(1, 5))
  # Query 0: AP 1. Query 1: skipped (nan). Query 2: positive at position 1 ->
  # (0 + 1/2) / 2 = 1/4. Mean over the two scored queries: 5/8 (not 5/12).
  assert np.isnan(aps[1]) and np.all(np.isnan(prs[1]))
  np.testing.assert_allclose(aps[[0, 2]], [1., 0.25])
  assert m == pytest.approx(5 / 8)
  # mP@1: query 0 -> 1; query 2: kq = min(last positive 2, 1) = 1, 0 of 1 -> 0.
  # mP@5: query 0: kq = min(1, 5) = 1 -> 1; query 2: kq = 2, 1 of 2 -> 1/2.
  np.testing.assert_allclose(prs[[0, 2]], [[1., 1.], [0., .5]])
  np.testing.assert_allclose(pr, [.5, .75])


def test_mean_precision_at_k_uses_last_positive():
  n = 20
  # Positives 7, 9 at 1-based positions 1 and 3 (junk 4 comes after both), kappas 1, 5, 10:
  #   k=1: kq=min(3, 1)=1 -> 1/1;  k=5: kq=min(3, 5)=3 -> 2/3;  k=10: kq=3 -> 2/3.
  ranks = _ranks(_complete([7, 0, 9, 4], n))
  _, _, pr, prs = revisited.compute_map(ranks, [{'ok': [7, 9], 'junk': [4]}], (1, 5, 10))
  np.testing.assert_allclose(prs[0], [1., 2 / 3, 2 / 3])
  np.testing.assert_allclose(pr, prs[0])
  # Junk before a positive shifts it: 1-based position 3 becomes 2 -> k=5: kq=2 -> 2/2.
  ranks = _ranks(_complete([7, 4, 9], n))
  _, _, _, prs = revisited.compute_map(ranks, [{'ok': [7, 9], 'junk': [4]}], (1, 5, 10))
  np.testing.assert_allclose(prs[0], [1., 1., 1.])


def test_ties_resolved_by_rank_all_towards_lower_index():
  from retrieval_jax import knn
  # Database rows 0 and 1 are identical; row 2 is far. The tie goes to index 0.
  db = np.array([[1., 0.], [1., 0.], [0., 1.]], np.float32)
  q = np.array([[1., 0.]], np.float32)
  ranks = knn.rank_all(q, db)
  np.testing.assert_array_equal(ranks[:, 0], [0, 1, 2])
  # So positive 1 sits at 0-based position 1: AP = (0 + 1/2) / 2 = 1/4.
  m, _, _, _ = revisited.compute_map(ranks, [{'ok': [1]}], kappas=())
  assert m == pytest.approx(.25)


def test_build_revisited_gnd_setups():
  gnd = [{'easy': [1, 2], 'hard': [3], 'junk': [4]}]
  e, = revisited.build_revisited_gnd(gnd, 'easy')
  m, = revisited.build_revisited_gnd(gnd, 'medium')
  h, = revisited.build_revisited_gnd(gnd, 'hard')
  assert sorted(e['ok']) == [1, 2] and sorted(e['junk']) == [3, 4]
  assert sorted(m['ok']) == [1, 2, 3] and sorted(m['junk']) == [4]
  assert sorted(h['ok']) == [3] and sorted(h['junk']) == [1, 2, 4]
  with pytest.raises(ValueError):
    revisited.build_revisited_gnd(gnd, 'medum')


# --------------------------------------------------------------------------------------
# Real Revisited Oxford / Paris ground truth
# --------------------------------------------------------------------------------------
def _reference_map(ranks, gnd, kappas):
  """Straight from the definition: drop junk from the list, then walk the PR curve."""
  aps, prs = [], []
  for i, g in enumerate(gnd):
    ok, junk = set(np.asarray(g['ok']).tolist()), set(np.asarray(g['junk']).tolist())
    if not ok:
      continue
    kept = [int(x) for x in ranks[:, i] if int(x) not in junk]
    rel = np.array([x in ok for x in kept], dtype=np.float64)
    hits = np.cumsum(rel)
    ap = 0.
    for pos in np.flatnonzero(rel):
      right = hits[pos] / (pos + 1)
      left = 1. if pos == 0 else hits[pos - 1] / pos
      ap += (left + right) / 2 / len(ok)
    aps.append(ap)
    last = np.flatnonzero(rel)[-1] + 1
    prs.append([rel[:min(k, last)].sum() / min(k, last) for k in kappas])
  return np.mean(aps), np.mean(prs, axis=0)


@pytest.fixture(scope='module', params=['roxford5k', 'rparis6k'])
def real_gnd(request):
  path = SHARED_DATA / 'revisited' / f'gnd_{request.param}.pkl'
  if not path.exists():
    pytest.skip(f'{path} not available')
  with open(path, 'rb') as f:  # Trusted: the official file copied into ../shared.
    cfg = pickle.load(f)
  return request.param, cfg


def test_real_gnd_random_ranks_match_reference(real_gnd):
  name, cfg = real_gnd
  n_db, n_q = len(cfg['imlist']), len(cfg['qimlist'])
  assert n_q == 70 and n_db == {'roxford5k': 4993, 'rparis6k': 6322}[name]
  rng = np.random.default_rng(0)
  # Random rankings, but with the positives pulled towards the top so APs are not ~0.
  ranks = np.empty((n_db, n_q), np.int64)
  for q in range(n_q):
    score = rng.random(n_db)
    pos = np.concatenate([cfg['gnd'][q]['easy'], cfg['gnd'][q]['hard']]).astype(int)
    score[pos] += rng.random(len(pos)) * 1.5
    ranks[:, q] = np.argsort(-score)
  kappas = (1, 5, 10)
  for setup in revisited.SETUPS:
    gnd = revisited.build_revisited_gnd(cfg['gnd'], setup)
    m, aps, pr, _ = revisited.compute_map(ranks, gnd, kappas)
    ref_m, ref_pr = _reference_map(ranks, gnd, kappas)
    assert m == pytest.approx(ref_m, rel=1e-12)
    np.testing.assert_allclose(pr, ref_pr, rtol=1e-12)
    assert np.isnan(aps).sum() == sum(len(g['ok']) == 0 for g in gnd)
    assert 0.05 < m < 0.95
  out = revisited.evaluate_revisited(name, ranks, cfg['gnd'])
  assert out['mAP_M'] == pytest.approx(round(100 * _reference_map(
      ranks, revisited.build_revisited_gnd(cfg['gnd'], 'medium'), kappas)[0], 2))


def test_real_gnd_perfect_ranking_is_100(real_gnd):
  name, cfg = real_gnd
  n_db, n_q = len(cfg['imlist']), len(cfg['qimlist'])
  ranks = np.empty((n_db, n_q), np.int64)
  for q, g in enumerate(cfg['gnd']):
    # Easy, then hard, then junk, then the rest: perfect in all three setups.
    ranks[:, q] = _complete(list(g['easy']) + list(g['hard']) + list(g['junk']), n_db)
  out = revisited.evaluate_revisited(name, ranks, cfg['gnd'])
  for s in 'EMH':
    assert out[f'mAP_{s}'] == 100.
    np.testing.assert_allclose(out[f'mP@k_{s}'], 100.)
  assert out['lines'][0] == f'>> {name}: mAP E: 100.0, M: 100.0, H: 100.0'
  # Reversing the ranking must fall far below.
  out = revisited.evaluate_revisited(name, ranks[::-1], cfg['gnd'])
  assert out['mAP_M'] < 5.


def test_evaluate_revisited_print_format():
  n = 8
  gnd = [{'easy': [0], 'hard': [1], 'junk': [2]}, {'easy': [3, 4], 'hard': [], 'junk': []}]
  ranks = _ranks(_complete([5, 0, 2, 1], n), _complete([3, 6, 4], n))
  out = revisited.evaluate_revisited('roxford5k', ranks, gnd)
  assert re.fullmatch(r'>> roxford5k: mAP E: [\d.]+, M: [\d.]+, H: [\d.]+', out['lines'][0])
  assert re.fullmatch(r'>> roxford5k: mP@k\[1, 5, 10\] E: \[.*\], M: \[.*\], H: \[.*\]',
                      out['lines'][1])
  # E: q0 positive 0 at position 1 -> 1/4 (junk 1, 2 after it); q1 positives 3, 4 at 0, 2
  # -> 19/24. Mean (1/4 + 19/24) / 2 = 25/48 -> 52.08.
  assert out['mAP_E'] == 52.08
  # H: only q0 has hard positives; 1 at position 3, junk 0 and 2 removed -> position 1.
  assert out['mAP_H'] == 25.


# --------------------------------------------------------------------------------------
# Classic protocols
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize('folder,revisited_name', [('oxford5k_gt', 'roxford5k'),
                                                   ('paris6k_gt', 'rparis6k')])
def test_read_classic_gt_real_files(folder, revisited_name):
  gt_dir = SHARED_DATA / folder
  if not gt_dir.exists():
    pytest.skip(f'{gt_dir} not available')
  gt = classic.read_classic_gt(str(gt_dir))
  assert len(gt['qimlist']) == 55 and len(gt['gnd']) == 55
  assert gt['bbx'].shape == (55, 4) and gt['bbx'].dtype == np.float64
  assert np.all(gt['bbx'][:, 2] > gt['bbx'][:, 0]) and np.all(gt['bbx'][:, 3] > gt['bbx'][:, 1])
  if folder == 'oxford5k_gt':
    assert gt['qimlist'][0] == 'all_souls_000013'  # 'oxc1_' prefix stripped.
    np.testing.assert_allclose(gt['bbx'][0], [136.5, 34.1, 648.5, 955.7])
  for g in gt['gnd']:
    assert len(g['good']) <= len(g['ok']) and set(g['good']) <= set(g['ok'])
    assert not set(g['ok']) & set(g['junk'])
  # The revisited datasets kept the 55 original queries first, with the same boxes.
  pkl = SHARED_DATA / 'revisited' / f'gnd_{revisited_name}.pkl'
  if pkl.exists():
    with open(pkl, 'rb') as f:
      cfg = pickle.load(f)
    assert cfg['qimlist'][:55] == gt['qimlist']
    np.testing.assert_allclose(gt['bbx'], [g['bbx'] for g in cfg['gnd'][:55]])
  # Names -> indices with a database list.
  imlist = sorted({n for g in gt['gnd'] for n in g['ok'] + g['junk']})
  gti = classic.read_classic_gt(str(gt_dir), imlist)
  assert [imlist[i] for i in gti['gnd'][3]['ok']] == gt['gnd'][3]['ok']
  assert gti['gnd'][3]['junk'].dtype == np.int64


def test_read_classic_gt_fake_files(tmp_path):
  (tmp_path / 'tower_1_query.txt').write_text('oxc1_img_a 1.5 2 30.25 40\n')
  (tmp_path / 'tower_1_good.txt').write_text('img_b\nimg_c\n')
  (tmp_path / 'tower_1_ok.txt').write_text('img_d\n')
  (tmp_path / 'tower_1_junk.txt').write_text('img_e\n')
  gt = classic.read_classic_gt(str(tmp_path), ['img_e', 'img_d', 'img_c', 'img_b', 'img_a'])
  assert gt['qimlist'] == ['img_a']
  np.testing.assert_allclose(gt['bbx'], [[1.5, 2., 30.25, 40.]])
  np.testing.assert_array_equal(gt['gnd'][0]['ok'], [3, 2, 1])
  np.testing.assert_array_equal(gt['gnd'][0]['junk'], [0])
  ranks = _ranks([3, 0, 2, 4, 1])  # b, (junk e), c, a, d -> positives at 0, 1, 3.
  # AP: 1/3 + 1/3 + (2/3 + 3/4) / 2 / 3 = 2/3 + 17/72 = 65/72.
  out = classic.evaluate_classic('fake', ranks, gt['gnd'])
  assert out['mAP'] == round(100 * 65 / 72, 2)
  assert out['lines'] == [f'>> fake: mAP {round(100 * 65 / 72, 2)}']


def test_holidays_hand_case():
  names = ['100000.jpg', '100001.jpg', '100002.jpg', '100100.jpg', '100101.jpg']
  qidx, gnd = classic.holidays_gnd(names)
  np.testing.assert_array_equal(qidx, [0, 3])
  np.testing.assert_array_equal(gnd[0]['ok'], [1, 2])
  # Query 0 ranks itself first (removed), then 3 (wrong), 1, 2: positives at 1, 2 ->
  #   (0 + 1/2)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 1/8 + 7/24 = 5/12.
  # Query 3 ranks 4 second after itself -> after removal first -> AP 1.
  ranks = _ranks([0, 3, 1, 2, 4], [3, 4, 0, 1, 2])
  assert classic.holidays_map(ranks, names) == pytest.approx(100 * (5 / 12 + 1) / 2)
  # The query anywhere else in its own list does not count either.
  ranks = _ranks([1, 0, 2, 3, 4], [4, 0, 1, 2, 3])
  assert classic.holidays_map(ranks, names) == pytest.approx(100.)


def test_ukbench_score():
  n = 12  # 3 groups of 4.
  perfect = np.stack([_complete(list(range(4 * (i // 4), 4 * (i // 4) + 4)), n)
                      for i in range(n)], axis=1)
  assert classic.ukbench_score(perfect) == 4.
  ranks = perfect.copy()
  # Image 0 retrieves 0, 1, 4, 5 -> 2 of its group; image 5 retrieves 0, 1, 2, 3 -> 0.
  ranks[:, 0] = _complete([0, 1, 4, 5], n)
  ranks[:, 5] = _complete([0, 1, 2, 3], n)
  assert classic.ukbench_score(ranks) == pytest.approx((10 * 4 + 2 + 0) / 12)


def test_gldv2_map_at_100_hand_case():
  solution = {'a': ['x', 'y'], 'b': ['z'], 'c': ['w']}
  predictions = {'a': ['x', 'q', 'y'], 'b': ['q', 'z', 'z']}
  # a: x at 1 -> 1/1, y at 3 -> 2/3; / min(2, 100) -> 5/6.  b: z at 2 -> 1/2 (the
  # duplicate is skipped).  c: not predicted -> 0, still counted.  mAP = (5/6 + 1/2) / 3.
  assert classic.mean_average_precision(predictions, solution) == pytest.approx(4 / 9)
  # max_predictions=2: a -> 1/1 / min(2, 2) = 1/2; b -> 1/2; mean over 3 -> 1/3.
  assert classic.mean_average_precision(predictions, solution, 2) == pytest.approx(1 / 3)
  with pytest.raises(ValueError):
    classic.mean_average_precision({'d': ['x']}, solution)
  # Array form: query 2 has no positives and is not part of the solution.
  topk = np.array([[0, 5, 1], [5, 2, 2], [1, 2, 3]])
  assert classic.gldv2_retrieval_map(topk, [[0, 1], [2], []]) == pytest.approx(
      ((1 + 2 / 3) / 2 + 1 / 2) / 2)


def test_gldv2_gap_hand_case():
  solution = {'a': [1], 'b': [2], 'c': [], 'd': [3]}
  predictions = {'a': {'class': 1, 'score': .9}, 'b': {'class': 5, 'score': .8},
                 'c': {'class': 1, 'score': .7}, 'd': {'class': 3, 'score': .6}}
  # Sorted by score: a right (1/1), b wrong, c wrong (no landmark), d right (2/4).
  # 3 images with ground truth: GAP = (1 + 1/2) / 3.
  assert classic.global_average_precision(predictions, solution) == pytest.approx(.5)
  # Ignoring c: d becomes 2/3 -> (1 + 2/3) / 3.
  assert classic.global_average_precision(predictions, solution, True) == pytest.approx(5 / 9)
  # Right, right, wrong by decreasing score: (1/1 + 2/2) / 3 (ascending would give 7/18).
  rrw = {'a': {'class': 1, 'score': .9}, 'b': {'class': 2, 'score': .5},
         'c': {'class': 9, 'score': .1}}
  assert classic.global_average_precision(rrw, {'a': [1], 'b': [2], 'c': [3]}) == (
      pytest.approx(2 / 3))
  # Equal scores: key ascending breaks the tie, so the right 'a' comes before the wrong
  # 'b' -> (1/1) / 2, not (1/2) / 2.
  tie = {'b': {'class': 2, 'score': .5}, 'a': {'class': 1, 'score': .5}}
  assert classic.global_average_precision(tie, {'a': [1], 'b': [1]}) == pytest.approx(.5)
  assert classic.gldv2_recognition_gap(np.array([1, 5, 1, 3]), np.array([.9, .8, .7, .6]),
                                       [[1], [2], [], [3]]) == pytest.approx(.5)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------
def _l2n(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_registry_names_and_labels_map():
  for name in ('roxford5k', 'rparis6k', 'oxford5k', 'paris6k', 'holidays', 'ukbench',
               'gldv2_retrieval', 'gldv2_recognition', 'labels'):
    evaluator, printed = evaluation.get_evaluator(name)
    assert callable(evaluator.score) and printed == name
  with pytest.raises(KeyError):
    evaluation.get_evaluator('nope')
  # One query of label 0; database labels 1, 0, 0 ranked in this order (decreasing x).
  q = np.array([[1., 0.]], np.float32)
  db = _l2n(np.array([[1., .1], [1., .5], [1., .9]], np.float32))
  # Positives at 1, 2: (0 + 1/2)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 5/12.
  assert evaluation.labels_map(q, db, [0], [1, 0, 0]) == pytest.approx(100 * 5 / 12, rel=1e-6)
  out = evaluation.evaluate_descriptors('labels', q, db,
                                       {'query_labels': [0], 'db_labels': [1, 0, 0]})
  assert out['mAP'] == pytest.approx(100 * 5 / 12, rel=1e-6)
  assert out['lines'] == ['>> labels: mAP 41.67']


def test_evaluators_on_clustered_descriptors():
  rng = np.random.default_rng(1)
  centres = _l2n(rng.normal(size=(5, 32)))
  labels = np.repeat(np.arange(5), 4)
  db = _l2n(centres[labels] + .05 * rng.normal(size=(20, 32))).astype(np.float32)
  assert evaluation.evaluate_descriptors('ukbench', db, db, None)['N-S'] == 4.
  names = [f'{100000 + 100 * g + j}.jpg' for g in range(5) for j in range(4)]
  out = evaluation.evaluate_descriptors('holidays', db[::4], db, names)
  assert out['mAP'] == pytest.approx(100.)
  positives = [np.flatnonzero(labels == l) for l in labels[::4]]
  out = evaluation.evaluate_descriptors('gldv2_retrieval', db[::4], db,
                                       {'positives': positives})
  assert out['mAP@100'] == pytest.approx(100.)
  out = evaluation.evaluate_descriptors('gldv2_recognition',
      db[1::4], db[::4], {'db_labels': labels[::4], 'query_labels': [[l] for l in range(5)]})
  assert out['GAP'] == pytest.approx(100.)
  gnd = [{'easy': list(np.flatnonzero(labels == l)[:2]),
          'hard': list(np.flatnonzero(labels == l)[2:]), 'junk': []} for l in range(5)]
  out = evaluation.evaluate_descriptors('roxford5k', centres.astype(np.float32), db,
                                       {'gnd': gnd})
  assert out['mAP_M'] == 100.
  out = evaluation.evaluate_descriptors('oxford5k',
      centres.astype(np.float32), db,
      [{'ok': np.flatnonzero(labels == l), 'junk': []} for l in range(5)])
  assert out['mAP'] == 100.
  # Shuffled labels must not score perfectly.
  assert evaluation.labels_map(db, db, labels, rng.permutation(labels)) < 90.


def test_evaluators_accept_loader_gnd():
  rng = np.random.default_rng(5)
  centres = _l2n(rng.normal(size=(5, 32)))
  labels = np.repeat(np.arange(5), 4)
  db = _l2n(centres[labels] + .05 * rng.normal(size=(20, 32))).astype(np.float32)
  # UKBench: 'ok' = the 4 group members, itself included; one gnd made wrong on purpose.
  gnd = [{'ok': np.flatnonzero(labels == labels[i]), 'junk': []} for i in range(20)]
  assert evaluation.evaluate_descriptors('ukbench', db, db, {'gnd': gnd})['N-S'] == 4.
  gnd[0] = {'ok': np.flatnonzero(labels == 1), 'junk': []}
  assert evaluation.evaluate_descriptors('ukbench', db, db, {'gnd': gnd})['N-S'] == 4. - 4 / 20
  # Holidays: 'ok' = the rest of the group, 'junk' = the query itself.
  qi = np.arange(0, 20, 4)
  gnd = [{'ok': np.flatnonzero((labels == labels[i]) & (np.arange(20) != i)), 'junk': [i]}
         for i in qi]
  assert evaluation.evaluate_descriptors('holidays', db[qi], db, {'gnd': gnd})['mAP'] == (
      pytest.approx(100.))
  # GLDv2 from the loader ('gldv2' alias): per-usage scores; one Private query is wrong.
  gnd = [{'ok': np.flatnonzero(labels == l), 'junk': [], 'usage': u}
         for l, u in zip(range(5), ['Public', 'Public', 'Private', 'Private', 'Private'])]
  gnd[4]['ok'] = np.flatnonzero(labels == 0)
  out = evaluation.evaluate_descriptors('gldv2', centres.astype(np.float32), db, {'gnd': gnd})
  # The wrong query finds its 4 "positives" (cluster 0) after its own cluster, at 1-based
  # ranks r_1 < ... < r_4 > 4 of a brute-force ranking: AP = sum_j (j / r_j) / 4.
  order = np.argsort(-(db @ centres[4]))
  r = np.sort(np.flatnonzero(np.isin(order, np.flatnonzero(labels == 0)))) + 1
  assert r[0] > 4
  wrong = sum((j + 1) / rj for j, rj in enumerate(r)) / 4
  assert out['mAP@100_public'] == pytest.approx(100.)
  assert out['mAP@100_private'] == pytest.approx(100 * (2 + wrong) / 3)
  assert out['mAP@100'] == pytest.approx(100 * (4 + wrong) / 5)
  # A '+1m' name uses the base evaluator and prints its own name.
  rgnd = [{'easy': np.flatnonzero(labels == l)[:3], 'hard': np.flatnonzero(labels == l)[3:],
           'junk': []} for l in range(5)]
  out = evaluation.evaluate_descriptors('roxford5k+1m', centres.astype(np.float32), db,
                                       {'gnd': rgnd})
  assert out['lines'][0] == '>> roxford5k+1m: mAP E: 100.0, M: 100.0, H: 100.0'
  # No query with a hard positive at all: H is nan instead of a division by zero.
  for l, g in enumerate(rgnd):
    g['easy'], g['hard'] = np.flatnonzero(labels == l), []
  out = evaluation.evaluate_descriptors('roxford5k', centres.astype(np.float32), db, {'gnd': rgnd})
  assert out['mAP_E'] == 100. and np.isnan(out['mAP_H'])


# --------------------------------------------------------------------------------------
# Query expansion / database augmentation
# --------------------------------------------------------------------------------------
def _positive_unit_rows(rng, n, d):
  # Non-negative vectors: all similarities >= 0, so max(s, 0) is the plain power.
  return _l2n(np.abs(rng.normal(size=(n, d)))).astype(np.float32)


def test_alpha_qe_matches_numpy_formula():
  rng = np.random.default_rng(2)
  q, db = _positive_unit_rows(rng, 5, 16), _positive_unit_rows(rng, 30, 16)
  k, alpha = 4, 3.
  out = rerank.alpha_query_expansion(q, db, k, alpha)
  sim = q.astype(np.float64) @ db.T.astype(np.float64)
  ref = []
  for i in range(len(q)):
    top = np.argsort(-sim[i])[:k]
    v = q[i] + np.sum((sim[i, top] ** alpha)[:, None] * db[top], axis=0)
    ref.append(v / np.linalg.norm(v))
  np.testing.assert_allclose(out, np.array(ref), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1., atol=1e-5)
  # k = 0 leaves the queries alone; alpha = 0 is the plain average.
  np.testing.assert_allclose(rerank.alpha_query_expansion(q, db, 0), q, atol=1e-6)
  out0 = rerank.alpha_query_expansion(q, db, 2, 0.)
  top = np.argsort(-sim[0])[:2]
  v = q[0] + db[top].sum(0)
  np.testing.assert_allclose(out0[0], v / np.linalg.norm(v), atol=1e-5)


def test_alpha_dba_matches_numpy_formula():
  rng = np.random.default_rng(3)
  db = _positive_unit_rows(rng, 25, 8)
  k, alpha = 3, 2.
  out = rerank.alpha_database_augmentation(db, k, alpha)
  sim = db.astype(np.float64) @ db.T.astype(np.float64)
  ref = []
  for i in range(len(db)):
    top = np.argsort(-sim[i])[:k]
    assert top[0] == i  # Itself first, weight 1.
    v = np.sum((sim[i, top] ** alpha)[:, None] * db[top], axis=0)
    ref.append(v / np.linalg.norm(v))
  np.testing.assert_allclose(out, np.array(ref), atol=1e-5)
  np.testing.assert_allclose(rerank.alpha_database_augmentation(db, 1), db, atol=1e-6)


def test_qe_improves_a_noisy_query():
  rng = np.random.default_rng(4)
  centre = _l2n(rng.normal(size=(1, 64)))
  db = _l2n(np.concatenate([centre + .3 * rng.normal(size=(10, 64)),
                            rng.normal(size=(200, 64))])).astype(np.float32)
  q = _l2n(centre + .8 * rng.normal(size=(1, 64))).astype(np.float32)
  qe = rerank.alpha_query_expansion(q, db, 3, 3.)
  assert float(qe[0] @ centre[0]) > float(q[0] @ centre[0])


# --------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------
def test_results_picture_colours_and_size(tmp_path):
  colours = [(10 * i, 200 - 10 * i, 50) for i in range(6)]
  db = [np.full((20 + i, 30, 3), c, np.uint8) for i, c in enumerate(colours)]
  queries = [np.full((25, 25, 3), (255, 255, 0), np.uint8),
             np.full((10, 40, 3), 1., np.float32)]
  ranks = _ranks([2, 0, 5, 1, 3, 4], [4, 3, 2, 1, 0, 5])
  gnd = [{'ok': [2, 1], 'junk': [0]}, {'ok': [], 'junk': [3]}]
  k, thumb, border, gap = 3, 40, 5, 4
  path = tmp_path / 'sub' / 'grid.png'
  pictures.save_results(path, queries, db, ranks, gnd, k=k, thumb=thumb, border=border,
                        gap=gap)
  im = Image.open(path)
  assert im.format == 'PNG'
  cell = thumb + 2 * border
  assert im.size == ((k + 1) * (cell + gap) + gap, 2 * (cell + gap) + gap)
  im = im.convert('RGB')

  def frame(r, c):  # A pixel inside the frame of cell (r, c).
    return im.getpixel((gap + c * (cell + gap) + 1, gap + r * (cell + gap) + 1))

  def centre(r, c):
    return im.getpixel((gap + c * (cell + gap) + cell // 2, gap + r * (cell + gap) + cell // 2))

  assert frame(0, 0) == pictures.QUERY_COLOUR and frame(1, 0) == pictures.QUERY_COLOUR
  # Query 0: 2 (ok), 0 (junk), 5 (wrong).  Query 1: 4 (wrong), 3 (junk), 2 (wrong).
  assert [frame(0, c) for c in (1, 2, 3)] == [pictures.OK_COLOUR, pictures.JUNK_COLOUR,
                                             pictures.WRONG_COLOUR]
  assert [frame(1, c) for c in (1, 2, 3)] == [pictures.WRONG_COLOUR, pictures.JUNK_COLOUR,
                                             pictures.WRONG_COLOUR]
  # The images themselves sit in the cells (solid colours survive resizing).
  assert centre(0, 0) == (255, 255, 0) and centre(1, 0) == (255, 255, 255)
  assert centre(0, 1) == colours[2] and centre(1, 1) == colours[4]
  assert im.getpixel((0, 0)) == (255, 255, 255)  # Gap.

  paths = pictures.save_per_query(tmp_path / 'per', queries, db, ranks, gnd, k=2, thumb=16,
                                  border=2, gap=1)
  assert [Path(p).name for p in paths] == ['query_000.png', 'query_001.png']
  assert Image.open(paths[1]).size == (3 * 21 + 1, 21 + 1)


def test_results_picture_from_real_paths(tmp_path):
  folder = SHARED_DATA / 'ukbench_subset'
  if not folder.exists():
    pytest.skip(f'{folder} not available')
  paths = [str(folder / f'ukbench{i:05d}.jpg') for i in range(8)]
  ranks = _ranks(_complete([1, 2, 5], 8))
  im = pictures.results_grid([paths[0]], paths, ranks, [{'ok': [0, 1, 2, 3]}], k=3,
                             thumb=64, border=3, gap=2)
  assert im.size == (4 * 72 + 2, 72 + 2)
  y = 3
  assert im.getpixel((2 + 3 * 72 + 1, y)) == pictures.WRONG_COLOUR  # Image 5: other group.
  assert im.getpixel((2 + 1 * 72 + 1, y)) == pictures.OK_COLOUR
