"""Evaluators chosen by name (`config.evals.<name>`).

Every evaluator has the signature

    evaluator(query_descriptors [Nq, D], db_descriptors [Nd, D], ground_truth, *,
              mesh=None, dtype='float32') -> dict

and returns its metrics (percent unless said otherwise) plus 'lines', the printable
summary. Descriptors are rows, L2-normalised; similarity is the inner product computed by
`retrieval_jax.search` (sharded over the mesh's "data" axis when a mesh is given).

The ground truth may always be given as `{'gnd': [per-query dicts]}` in the revisitop
format with 'ok' / 'junk' (or 'easy' / 'hard' / 'junk') database indices, which is what
`retrieval_jax.data` loaders produce (`RetrievalSet.gnd`); the evaluator-specific forms
below are alternatives for callers that have no loader. A name with a suffix after '+'
(e.g. 'roxford5k+1m') uses the evaluator of its base name and prints the full name.

Ground truth per evaluator:
  'roxford5k', 'rparis6k': the loaded `gnd_r*.pkl` dict (key 'gnd': per query 'easy',
      'hard', 'junk'), or the list itself. Queries in `qimlist` order, already cropped.
  'oxford5k', 'paris6k': dict with 'gnd' (per query 'ok' = good+ok, 'junk' indices) as
      `classic.read_classic_gt(dir, imlist)` gives, or that list.
  'holidays': {'gnd'} (ok = rest of the group, junk = the query itself), or the database
      image names ('100000.jpg', ...) / a dict with 'imlist', the queries then being the
      images whose number is a multiple of 100, in database order.
  'ukbench': {'gnd'} (ok = the 4 group members, itself included), or None: queries are the
      database itself, in dataset order, groups of 4.
  'gldv2_retrieval' (alias 'gldv2'): {'gnd'} (ok = relevant index images; an optional
      'usage' of 'Public' / 'Private' adds per-split scores) or {'positives': per query
      relevant db indices}; empty = not scored; metric mAP@100.
  'gldv2_recognition': dict with 'db_labels' [Nd] and 'query_labels' (per query a list of
      landmark ids, empty for non-landmarks); the prediction is the label of the nearest
      database image, its similarity the confidence; metric GAP.
  'labels': dict with 'query_labels' [Nq] and 'db_labels' [Nd] integers; mAP where
      positives share the query's label (the demo's evaluator).
  'demo_real': {'gnd'} (ok = the other photos of the query's place, junk = the query
      itself, as the demo's real multi-view splits give it); mAP.
"""
import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from retrieval_jax import knn
from retrieval_jax import registry
from retrieval_jax.evaluation import classic
from retrieval_jax.evaluation.classic import (gldv2_recognition_gap, gldv2_retrieval_map,
                                              global_average_precision, holidays_map,
                                              mean_average_precision, read_classic_gt,
                                              ukbench_score)
from retrieval_jax.evaluation.revisited import (build_revisited_gnd, compute_ap, compute_map,
                                                evaluate_revisited)


@dataclasses.dataclass(frozen=True)
class Ranking:
  """Database indices [depth, Nq] best first (column j = query j) and, when known, their
  similarities [depth, Nq]; `per_setup`: rankings by Revisited protocol ('easy', 'medium',
  'hard') where they differ (DELG re-ranks with each protocol's junk), scored by the
  Revisited evaluator; `ranks` is then the Medium one."""
  ranks: np.ndarray
  scores: Optional[np.ndarray] = None
  per_setup: Optional[Mapping[str, np.ndarray]] = None


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """score(printed name, ranking, ground truth) -> metrics + 'lines'; `depth`: the ranking
  depth it reads (None: the whole database)."""
  score: Callable[[str, Ranking, Any], Dict[str, Any]]
  depth: Optional[int] = None


EVALUATORS: registry.Registry[Evaluator] = registry.Registry('evaluator')


def get_evaluator(name: str) -> Tuple[Evaluator, str]:
  """(the evaluator registered as `name` or as its base name for 'base+suffix' names, the
  name it prints); 'roxford5k+1m' scores as 'roxford5k' and prints its full name.

  Raises:
    KeyError: listing the known names, when neither is registered.
  """
  base = name.split('+', 1)[0]
  for key in (name, base):
    if key in EVALUATORS:
      return EVALUATORS.get(key), name
  raise KeyError(f'Unknown evaluator {name!r}; known: {EVALUATORS.names()}.')


def rank(q: np.ndarray, db: np.ndarray, depth: Optional[int] = None, *, mesh=None,
         dtype: str = 'float32') -> Ranking:
  """The top-`depth` (None: all) database rows of every query by inner product."""
  k = db.shape[0] if depth is None else min(int(depth), db.shape[0])
  s, i = knn.knn(q, db, k, mesh=mesh, dtype=dtype)
  return Ranking(np.ascontiguousarray(np.asarray(i).T.astype(np.int64)),
                 np.ascontiguousarray(np.asarray(s).T))


def evaluate_descriptors(name: str, q: np.ndarray, db: np.ndarray, gt: Any, *, mesh=None,
                         dtype: str = 'float32') -> Dict[str, Any]:
  """Evaluator `name` on the ranking of `db` for `q` (at the depth it needs)."""
  evaluator, printed = get_evaluator(name)
  return evaluator.score(printed, rank(q, db, evaluator.depth, mesh=mesh, dtype=dtype), gt)


def _gnd_list(gt: Any) -> Sequence[Mapping[str, Any]]:
  return gt['gnd'] if isinstance(gt, Mapping) and 'gnd' in gt else gt


def _has_gnd(gt: Any) -> bool:
  return isinstance(gt, Mapping) and 'gnd' in gt


def labels_map(q_desc: np.ndarray, db_desc: np.ndarray, q_labels: Sequence[int],
               db_labels: Sequence[int], *, mesh=None, dtype: str = 'float32') -> float:
  """mAP (percent) where a database image is positive when it shares the query's label.

  Args:
    q_desc: [Nq, D] query descriptors.
    db_desc: [Nd, D] database descriptors.
    q_labels: [Nq] integer labels.
    db_labels: [Nd] integer labels.
    mesh, dtype: passed to `knn.knn`.

  Returns:
    The revisitop mAP x 100 (no junk; queries without a positive are skipped).
  """
  ranking = rank(q_desc, db_desc, mesh=mesh, dtype=dtype)
  return _labels_score(ranking.ranks, q_labels, db_labels)


def _labels_score(ranks: np.ndarray, q_labels, db_labels) -> float:
  db_labels = np.asarray(db_labels)
  gnd = [{'ok': np.flatnonzero(db_labels == l), 'junk': np.empty(0, np.int64)}
         for l in np.asarray(q_labels)]
  return 100. * compute_map(ranks, gnd, kappas=())[0]


def _revisited(name: str, r: Ranking, gt: Any) -> Dict[str, Any]:
  """Revisited Oxford / Paris: mAP and mP@k for Easy / Medium / Hard."""
  return evaluate_revisited(name, r.ranks, _gnd_list(gt), (1, 5, 10), per_setup=r.per_setup)


def _classic(name: str, r: Ranking, gt: Any) -> Dict[str, Any]:
  """Original Oxford / Paris protocol: mAP with good+ok positives."""
  return classic.evaluate_classic(name, r.ranks, _gnd_list(gt))


for _name in ('roxford5k', 'rparis6k'):
  EVALUATORS.register(_name, Evaluator(_revisited))
for _name in ('oxford5k', 'paris6k'):
  EVALUATORS.register(_name, Evaluator(_classic))


def _holidays(name: str, r: Ranking, gt: Any) -> Dict[str, Any]:
  """INRIA Holidays mAP; the query itself is junk in its own ranking."""
  if _has_gnd(gt):
    m = 100. * compute_map(r.ranks, gt['gnd'], kappas=())[0]
  else:
    m = holidays_map(r.ranks, gt['imlist'] if isinstance(gt, Mapping) else gt)
  return {'mAP': m, 'lines': [f'>> {name}: mAP {m:.2f}']}


def _ukbench(name: str, r: Ranking, gt: Any = None) -> Dict[str, Any]:
  """UKBench N-S score (top-4 same-object count, 4 is perfect)."""
  if _has_gnd(gt):
    score = float(np.mean([np.isin(r.ranks[:4, i], np.asarray(g['ok'])).sum()
                           for i, g in enumerate(gt['gnd'])]))
  else:
    score = ukbench_score(r.ranks[:4], 4)
  return {'N-S': score, 'lines': [f'>> {name}: N-S score {score:.3f}']}


_GLDV2_PREDICTIONS = 100  # the challenge's mAP@100


def _gldv2_retrieval(name: str, r: Ranking, gt: Any) -> Dict[str, Any]:
  """GLDv2 retrieval mAP@100 (percent); per 'usage' split (Public / Private) too when the
  gnd has one."""
  del name  # printed as the challenge names it
  idx = np.asarray(r.ranks)[:_GLDV2_PREDICTIONS].T
  if _has_gnd(gt):
    positives = [g['ok'] for g in gt['gnd']]
    usages = [g.get('usage') for g in gt['gnd']]
  else:
    positives, usages = gt['positives'], [None] * len(gt['positives'])
  k = _GLDV2_PREDICTIONS
  m = 100. * gldv2_retrieval_map(idx, positives, k)
  out = {'mAP@100': m}
  line = f'>> gldv2_retrieval: mAP@{k} {m:.2f}'
  for usage in ('Public', 'Private'):
    sel = [i for i, u in enumerate(usages) if u == usage]
    if sel:
      mu = 100. * gldv2_retrieval_map(idx[sel], [positives[i] for i in sel], k)
      out[f'mAP@100_{usage.lower()}'] = mu
      line += f', {usage.lower()} {mu:.2f}'
  out['lines'] = [line]
  return out


def _gldv2_recognition(name: str, r: Ranking, gt: Any) -> Dict[str, Any]:
  """GLDv2 recognition GAP (percent) by the label of the nearest database image, its
  similarity the confidence."""
  del name
  if r.scores is None:
    raise ValueError('gldv2_recognition needs the similarities of the top-1 image')
  pred = np.asarray(gt['db_labels'])[np.asarray(r.ranks)[0]]
  gap = 100. * gldv2_recognition_gap(pred, np.asarray(r.scores)[0], gt['query_labels'])
  return {'GAP': gap, 'lines': [f'>> gldv2_recognition: GAP {gap:.2f}']}


def _labels(name: str, r: Ranking, gt: Any) -> Dict[str, Any]:
  """Same-label mAP (percent)."""
  del name
  m = _labels_score(r.ranks, gt['query_labels'], gt['db_labels'])
  return {'mAP': m, 'lines': [f'>> labels: mAP {m:.2f}']}


EVALUATORS.register('holidays', Evaluator(_holidays))
# The demo's real multi-view groups: every photo a query, itself junk, as Holidays.
EVALUATORS.register('demo_real', EVALUATORS.get('holidays'))
EVALUATORS.register('ukbench', Evaluator(_ukbench, depth=4))
EVALUATORS.register('gldv2_retrieval', Evaluator(_gldv2_retrieval, depth=_GLDV2_PREDICTIONS))
EVALUATORS.register('gldv2', EVALUATORS.get('gldv2_retrieval'))
EVALUATORS.register('gldv2_recognition', Evaluator(_gldv2_recognition, depth=1))
EVALUATORS.register('labels', Evaluator(_labels))


__all__ = [
    'EVALUATORS', 'Evaluator', 'Ranking', 'get_evaluator', 'rank', 'evaluate_descriptors',
    'labels_map', 'compute_ap', 'compute_map',
    'build_revisited_gnd', 'evaluate_revisited', 'read_classic_gt', 'holidays_map',
    'ukbench_score', 'mean_average_precision', 'global_average_precision',
    'gldv2_retrieval_map', 'gldv2_recognition_gap',
]
