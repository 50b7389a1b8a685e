"""Evaluators chosen by name (`config.evals.<name>`).

Every evaluator has the signature

    evaluator(query_descriptors [Nq, D], db_descriptors [Nd, D], ground_truth, *,
              mesh=None, dtype='float32') -> dict

and returns its metrics (percent unless said otherwise) plus 'lines', the printable
summary. The ranking evaluators also take `ranker=fn(q, db, mesh=, dtype=) -> ranks [Nd, Nq]`
to score a re-ranking (e.g. `superglobal.ranker`) instead of `search.rank_all`. Descriptors are rows, L2-normalised; similarity is the inner product computed by
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
"""
from typing import Any, Callable, Dict, Mapping, Sequence

import numpy as np

from retrieval_jax import search
from retrieval_jax.evaluation import classic
from retrieval_jax.evaluation import revisited
from retrieval_jax.evaluation.classic import (gldv2_recognition_gap, gldv2_retrieval_map,
                                              global_average_precision, holidays_map,
                                              mean_average_precision, read_classic_gt,
                                              ukbench_score)
from retrieval_jax.evaluation.revisited import (build_revisited_gnd, compute_ap, compute_map,
                                                evaluate_revisited)

Evaluator = Callable[..., Dict[str, Any]]
EVALUATORS: Dict[str, Evaluator] = {}


def register(name: str) -> Callable[[Evaluator], Evaluator]:
  """Decorator adding an evaluator to `EVALUATORS` under `name`."""
  def wrap(fn: Evaluator) -> Evaluator:
    if name in EVALUATORS:
      raise ValueError(f'Evaluator {name!r} registered twice.')
    EVALUATORS[name] = fn
    return fn
  return wrap


def get_evaluator(name: str) -> Evaluator:
  """The evaluator registered as `name`, or of its base name for 'base+suffix' names.

  Raises:
    KeyError: listing the known names, when neither is registered.
  """
  if name in EVALUATORS:
    return EVALUATORS[name]
  base = name.split('+', 1)[0]
  if base in _NAMED_FACTORIES:
    return _NAMED_FACTORIES[base](name)
  if base in EVALUATORS:
    return EVALUATORS[base]
  raise KeyError(f'Unknown evaluator {name!r}; known: {sorted(EVALUATORS)}.')


def _ranks(q, db, mesh, dtype, ranker=None) -> np.ndarray:
  """Full rankings [Nd, Nq]: `ranker`'s, else `search.rank_all`'s."""
  return (ranker or search.rank_all)(q, db, mesh=mesh, dtype=dtype)


def _top(q, db, k: int, mesh, dtype, ranker=None) -> np.ndarray:
  """The top-k database indices [Nq, k] of every query (`ranker`'s order when given)."""
  if ranker is None:
    return search.knn(q, db, k, mesh=mesh, dtype=dtype)[1]
  return np.ascontiguousarray(ranker(q, db, mesh=mesh, dtype=dtype)[:k].T)


def _gnd_list(gt: Any) -> Sequence[Mapping[str, Any]]:
  return gt['gnd'] if isinstance(gt, Mapping) else gt


def labels_map(q_desc: np.ndarray, db_desc: np.ndarray, q_labels: Sequence[int],
               db_labels: Sequence[int], *, mesh=None, dtype: str = 'float32',
               ranker=None) -> float:
  """mAP (percent) where a database image is positive when it shares the query's label.

  Args:
    q_desc: [Nq, D] query descriptors.
    db_desc: [Nd, D] database descriptors.
    q_labels: [Nq] integer labels.
    db_labels: [Nd] integer labels.
    mesh, dtype: passed to `search.rank_all`.

  Returns:
    The revisitop mAP x 100 (no junk; queries without a positive are skipped).
  """
  db_labels = np.asarray(db_labels)
  gnd = [{'ok': np.flatnonzero(db_labels == l), 'junk': np.empty(0, np.int64)}
         for l in np.asarray(q_labels)]
  ranks = _ranks(q_desc, db_desc, mesh, dtype, ranker)
  return 100. * compute_map(ranks, gnd, kappas=())[0]


def _revisited(name: str) -> Evaluator:
  def evaluate(q, db, gt, *, mesh=None, dtype='float32', kappas=(1, 5, 10), ranker=None):
    ranks = _ranks(q, db, mesh, dtype, ranker)
    return evaluate_revisited(name, ranks, _gnd_list(gt), kappas)
  evaluate.__doc__ = f'Revisited {name}: mAP and mP@k for Easy / Medium / Hard.'
  return evaluate


def _classic(name: str) -> Evaluator:
  def evaluate(q, db, gt, *, mesh=None, dtype='float32', ranker=None):
    ranks = _ranks(q, db, mesh, dtype, ranker)
    return classic.evaluate_classic(name, ranks, _gnd_list(gt))
  evaluate.__doc__ = f'Original {name} protocol: mAP with good+ok positives.'
  return evaluate


# Evaluators whose printed name is the dataset's (so 'roxford5k+1m' prints as such).
_NAMED_FACTORIES = {'roxford5k': _revisited, 'rparis6k': _revisited,
                    'oxford5k': _classic, 'paris6k': _classic}
for _name, _factory in _NAMED_FACTORIES.items():
  register(_name)(_factory(_name))


def _has_gnd(gt: Any) -> bool:
  return isinstance(gt, Mapping) and 'gnd' in gt


@register('holidays')
def _holidays(q, db, gt, *, mesh=None, dtype='float32', ranker=None):
  """INRIA Holidays mAP; the query itself is junk in its own ranking."""
  ranks = _ranks(q, db, mesh, dtype, ranker)
  if _has_gnd(gt):
    m = 100. * compute_map(ranks, gt['gnd'], kappas=())[0]
  else:
    m = holidays_map(ranks, gt['imlist'] if isinstance(gt, Mapping) else gt)
  return {'mAP': m, 'lines': [f'>> holidays: mAP {m:.2f}']}


@register('ukbench')
def _ukbench(q, db, gt=None, *, mesh=None, dtype='float32', ranker=None):
  """UKBench N-S score (top-4 same-object count, 4 is perfect)."""
  idx = _top(q, db, 4, mesh, dtype, ranker)
  if _has_gnd(gt):
    score = float(np.mean([np.isin(idx[i], np.asarray(g['ok'])).sum()
                           for i, g in enumerate(gt['gnd'])]))
  else:
    score = ukbench_score(idx.T, 4)
  return {'N-S': score, 'lines': [f'>> ukbench: N-S score {score:.3f}']}


@register('gldv2_retrieval')
def _gldv2_retrieval(q, db, gt, *, mesh=None, dtype='float32', max_predictions=100,
                     ranker=None):
  """GLDv2 retrieval mAP@100 (percent); per 'usage' split too when the gnd has one."""
  k = min(max_predictions, db.shape[0])
  idx = _top(q, db, k, mesh, dtype, ranker)
  if _has_gnd(gt):
    positives = [g['ok'] for g in gt['gnd']]
    usages = [g.get('usage') for g in gt['gnd']]
  else:
    positives, usages = gt['positives'], [None] * len(gt['positives'])
  m = 100. * gldv2_retrieval_map(idx, positives, max_predictions)
  out = {'mAP@100': m}
  line = f'>> gldv2_retrieval: mAP@{max_predictions} {m:.2f}'
  for usage in ('Public', 'Private'):
    sel = [i for i, u in enumerate(usages) if u == usage]
    if sel:
      mu = 100. * gldv2_retrieval_map(idx[sel], [positives[i] for i in sel], max_predictions)
      out[f'mAP@100_{usage.lower()}'] = mu
      line += f', {usage.lower()} {mu:.2f}'
  out['lines'] = [line]
  return out


EVALUATORS['gldv2'] = _gldv2_retrieval


@register('gldv2_recognition')
def _gldv2_recognition(q, db, gt, *, mesh=None, dtype='float32', ranker=None):
  """GLDv2 recognition GAP (percent) by the label of the nearest database image."""
  if ranker is not None:
    raise ValueError('gldv2_recognition scores by the nearest image\'s similarity; a '
                     're-ranking (eval.rerank) gives no such score: evaluate without it')
  s, idx = search.knn(q, db, 1, mesh=mesh, dtype=dtype)
  pred = np.asarray(gt['db_labels'])[idx[:, 0]]
  gap = 100. * gldv2_recognition_gap(pred, s[:, 0], gt['query_labels'])
  return {'GAP': gap, 'lines': [f'>> gldv2_recognition: GAP {gap:.2f}']}


@register('labels')
def _labels(q, db, gt, *, mesh=None, dtype='float32', ranker=None):
  """Same-label mAP (percent)."""
  m = labels_map(q, db, gt['query_labels'], gt['db_labels'], mesh=mesh, dtype=dtype,
                 ranker=ranker)
  return {'mAP': m, 'lines': [f'>> labels: mAP {m:.2f}']}


__all__ = [
    'EVALUATORS', 'register', 'get_evaluator', 'labels_map', 'compute_ap', 'compute_map',
    'build_revisited_gnd', 'evaluate_revisited', 'read_classic_gt', 'holidays_map',
    'ukbench_score', 'mean_average_precision', 'global_average_precision',
    'gldv2_retrieval_map', 'gldv2_recognition_gap',
]
