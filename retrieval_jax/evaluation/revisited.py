"""Revisited Oxford / Paris evaluation (Radenovic et al., CVPR 2018).

A faithful transcription of the official `revisitop` code (`python/evaluate.py` and the
printing of `python/example_evaluate.py`), so that our numbers are the papers' numbers:

* AP is the trapezoidal area under the precision/recall curve, where the precision on the
  left of a positive at (0-based) position `r`, the `j`-th positive, is `j / r` (1 at r=0)
  and on the right `(j + 1) / (r + 1)`.
* Junk images are removed from the ranking (positives after them move up), not counted as
  negatives.
* Queries without positives get `nan` AP and are left out of the mean.
* mP@k for a query is `#positives in the top kq / kq` with `kq = min(k, position of the
  last positive)` (1-based), so a query with fewer than `k` positives can still reach 1.

Conventions: `ranks` is `[n_db, n_queries]`, column `j` holding database indices sorted by
decreasing similarity to query `j` (`np.argsort(-sim, axis=0)` with `sim = X.T @ Q`).
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

SETUPS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)


def compute_ap(ranks: np.ndarray, nres: int) -> float:
  """Average precision of one query from the positions of its positives.

  Args:
    ranks: [n_pos_found] zero-based, increasing positions of the positive images in the
      (junk-free) ranking.
    nres: total number of positive images of the query (>= len(ranks)).

  Returns:
    The trapezoidal AP in [0, 1].
  """
  nimgranks = len(ranks)
  ap = 0.
  recall_step = 1. / nres
  for j in np.arange(nimgranks):
    rank = ranks[j]
    if rank == 0:
      precision_0 = 1.
    else:
      precision_0 = float(j) / rank
    precision_1 = float(j + 1) / (rank + 1)
    ap += (precision_0 + precision_1) * recall_step / 2.
  return ap


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> Tuple[float, np.ndarray, np.ndarray, np.ndarray]:
  """Mean average precision and mean precision at `kappas`, as the revisitop code.

  Args:
    ranks: [n_db, n_queries] integer database indices; column `i` is the ranking of query
      `i`. Zero-based.
    gnd: n_queries dicts with 'ok' (positive database indices) and optionally 'junk'
      (indices removed from the ranking); lists or arrays.
    kappas: the k of mP@k.

  Returns:
    (map, aps, pr, prs): `map` a float in [0, 1] (mean over queries with positives; nan
    when no query has one, where the original code raises ZeroDivisionError),
    `aps` [n_queries] (nan where a query has no positives), `pr` [len(kappas)] mean
    precisions, `prs` [n_queries, len(kappas)] (nan rows for queries without positives).
  """
  ranks = np.asarray(ranks)
  kappas = list(kappas)
  mean_ap = 0.
  nq = len(gnd)
  aps = np.zeros(nq)
  pr = np.zeros(len(kappas))
  prs = np.zeros((nq, len(kappas)))
  nempty = 0

  for i in np.arange(nq):
    qgnd = np.asarray(gnd[i]['ok'])
    if qgnd.shape[0] == 0:
      aps[i] = float('nan')
      prs[i, :] = float('nan')
      nempty += 1
      continue
    qgndj = np.asarray(gnd[i].get('junk', np.empty(0)))

    # Sorted positions of positive and junk images (0 based).
    pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
    junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]

    k = 0
    ij = 0
    if len(junk):
      # Every junk image ranked before a positive moves that positive up by one.
      ip = 0
      while ip < len(pos):
        while ij < len(junk) and pos[ip] > junk[ij]:
          k += 1
          ij += 1
        pos[ip] = pos[ip] - k
        ip += 1

    ap = compute_ap(pos, len(qgnd))
    mean_ap = mean_ap + ap
    aps[i] = ap

    pos += 1  # 1-based positions.
    for j in np.arange(len(kappas)):
      kq = min(max(pos), kappas[j])
      prs[i, j] = (pos <= kq).sum() / kq
    pr = pr + prs[i, :]

  if nq == nempty:
    # The original divides by zero here; nan keeps a whole-setup-empty case printable.
    return float('nan'), aps, np.full(len(kappas), np.nan), prs
  mean_ap = mean_ap / (nq - nempty)
  pr = pr / (nq - nempty)
  return mean_ap, aps, pr, prs


def build_revisited_gnd(gnd: Sequence[Mapping[str, Any]],
                        setup: str) -> List[Dict[str, np.ndarray]]:
  """Turns the full revisited ground truth into the 'ok'/'junk' lists of one setup.

  Args:
    gnd: per-query dicts with 'easy', 'hard', 'junk' database indices (the `gnd` of
      `gnd_roxford5k.pkl` / `gnd_rparis6k.pkl`).
    setup: 'easy' (ok=easy, junk=junk+hard), 'medium' (ok=easy+hard, junk=junk) or 'hard'
      (ok=hard, junk=junk+easy).

  Returns:
    A list of {'ok': int array, 'junk': int array}, one per query.
  """
  def cat(*keys):
    return np.concatenate([np.asarray(g[k], dtype=np.int64) for k in keys])

  out = []
  for g in gnd:
    if setup == 'easy':
      out.append({'ok': cat('easy'), 'junk': cat('junk', 'hard')})
    elif setup == 'medium':
      out.append({'ok': cat('easy', 'hard'), 'junk': cat('junk')})
    elif setup == 'hard':
      out.append({'ok': cat('hard'), 'junk': cat('junk', 'easy')})
    else:
      raise ValueError(f'Unknown revisited setup {setup!r}; expected one of {SETUPS}.')
  return out


def evaluate_revisited(
    dataset_name: str,
    ranks: np.ndarray,
    gnd_full: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    per_setup: Optional[Mapping[str, np.ndarray]] = None,
) -> Dict[str, Any]:
  """Evaluates one ranking in the Easy, Medium and Hard setups.

  Args:
    dataset_name: printed name, e.g. 'roxford5k'.
    ranks: [n_db, n_queries] rankings (see `compute_map`).
    gnd_full: per-query dicts with 'easy', 'hard', 'junk'.
    kappas: the k of mP@k.
    per_setup: optional rankings by setup name ('easy', 'medium', 'hard') used instead of
      `ranks` for that setup (DELG's re-ranking with each protocol's junk).

  Returns:
    A dict with, for S in E/M/H: 'mAP_S' (percent, rounded to 2 decimals as printed),
    'mP@k_S' ([len(kappas)] percent), 'aps_S' ([n_queries] in [0, 1], nan for skipped
    queries), and 'lines': the summary lines in the format of the revisitop /
    cnnimageretrieval print, e.g. `>> roxford5k: mAP E: 74.88, M: 58.28, H: 30.4`.
  """
  kappas = list(kappas)
  out: Dict[str, Any] = {}
  maps, mprs = {}, {}
  for setup in SETUPS:
    s = setup[0].upper()
    setup_ranks = ranks if not per_setup or setup not in per_setup else per_setup[setup]
    m, aps, mpr, _ = compute_map(setup_ranks, build_revisited_gnd(gnd_full, setup), kappas)
    maps[s] = np.around(m * 100, decimals=2)
    mprs[s] = np.around(mpr * 100, decimals=2)
    out[f'mAP_{s}'] = float(maps[s])
    out[f'mP@k_{s}'] = mprs[s]
    out[f'aps_{s}'] = aps
  out['lines'] = [
      '>> {}: mAP E: {}, M: {}, H: {}'.format(dataset_name, maps['E'], maps['M'], maps['H']),
      '>> {}: mP@k{} E: {}, M: {}, H: {}'.format(dataset_name, kappas, mprs['E'], mprs['M'],
                                                 mprs['H']),
  ]
  return out
