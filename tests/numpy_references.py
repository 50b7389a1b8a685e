"""Independent numpy transcriptions of the reference evaluation code (test-only).

Written from the references, not from retrieval_jax (nothing here imports it), so that tests
can compare the project's numbers with them:

* revisitop `python/evaluate.py`: `compute_ap`, `compute_map` (junk removed by shifting the
  positives' positions, trapezoidal AP, mP@k), and `python/example_evaluate.py`'s Easy /
  Medium / Hard ground truth (`revisited_gnd`).
* cnnimageretrieval-pytorch `cirtorch/utils/whiten.py`: `whitenapply`, `pcawhitenlearn`,
  `whitenlearn`, `cholesky`, in its column layout X [D, N].
* alpha-QE and alpha-DBA from Radenovic, Tolias, Chum, "Fine-tuning CNN Image Retrieval with
  No Human Annotation" (TPAMI 2018), Section 5: the query (database vector) is replaced by the
  L2-normalised sum of itself and its top-n neighbours weighted by (q^T d)^alpha. The paper
  does not say what a negative similarity weighs; these take max(q^T d, 0)^alpha, the
  project's documented convention (retrieval_jax/evaluation/rerank.py), which matters after a
  whitening learned on few images, where top-n similarities can be negative.
"""
import numpy as np


# ----------------------------------------------------------------------------------------------
# revisitop


def compute_ap(ranks, nres):
  nimgranks = len(ranks)
  ap = 0
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


def compute_map(ranks, gnd, kappas=()):
  """ranks [n_db, n_queries]; gnd: per query {'ok': [...], 'junk': [...]}."""
  mean_ap = 0.
  nq = len(gnd)
  aps = np.zeros(nq)
  pr = np.zeros(len(kappas))
  prs = np.zeros((nq, len(kappas)))
  nempty = 0
  for i in np.arange(nq):
    qgnd = np.array(gnd[i]['ok'])
    if qgnd.shape[0] == 0:
      aps[i] = float('nan')
      prs[i, :] = float('nan')
      nempty += 1
      continue
    qgndj = np.array(gnd[i].get('junk', np.empty(0)))
    pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
    junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
    k = 0
    ij = 0
    if len(junk):
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
    pos += 1
    for j in np.arange(len(kappas)):
      kq = min(max(pos), kappas[j])
      prs[i, j] = (pos <= kq).sum() / kq
    pr = pr + prs[i, :]
  mean_ap = mean_ap / (nq - nempty)
  pr = pr / (nq - nempty)
  return mean_ap, aps, pr, prs


def revisited_gnd(gnd, setup):
  """The 'ok' / 'junk' lists of revisitop's example for setup 'easy', 'medium' or 'hard'."""
  out = []
  for g in gnd:
    easy, hard, junk = (np.asarray(g[k], np.int64) for k in ('easy', 'hard', 'junk'))
    if setup == 'easy':
      out.append({'ok': easy, 'junk': np.concatenate([junk, hard])})
    elif setup == 'medium':
      out.append({'ok': np.concatenate([easy, hard]), 'junk': junk})
    else:
      out.append({'ok': hard, 'junk': np.concatenate([junk, easy])})
  return out


def revisited_map_percent(ranks, gnd, setup):
  """mAP in percent, rounded to 2 decimals as revisitop prints it."""
  return float(np.around(compute_map(ranks, revisited_gnd(gnd, setup))[0] * 100, decimals=2))


def ranks_by_inner_product(queries, database):
  """[n_db, n_queries] database indices by decreasing q^T d (cirtorch's test.py)."""
  scores = np.dot(np.asarray(database, np.float64), np.asarray(queries, np.float64).T)
  return np.argsort(-scores, axis=0, kind='stable')


# ----------------------------------------------------------------------------------------------
# cirtorch/utils/whiten.py (columns are descriptors)


def whitenapply(X, m, P, dimensions=None):
  if not dimensions:
    dimensions = P.shape[0]
  X = np.dot(P[:dimensions, :], X - m)
  X = X / (np.linalg.norm(X, ord=2, axis=0, keepdims=True) + 1e-6)
  return X


def pcawhitenlearn(X, rank=None):
  """cirtorch's code; `rank` keeps only the leading components (cirtorch inverts all D
  eigenvalues, which fails when N <= D images span fewer than D dimensions)."""
  N = X.shape[1]
  m = X.mean(axis=1, keepdims=True)
  Xc = X - m
  Xcov = np.dot(Xc, Xc.T)
  Xcov = (Xcov + Xcov.T) / (2 * N)
  eigval, eigvec = np.linalg.eig(Xcov)
  order = eigval.argsort()[::-1]
  eigval = eigval[order]
  eigvec = eigvec[:, order]
  if rank is not None:
    eigval, eigvec = np.real(eigval[:rank]), np.real(eigvec[:, :rank])
  P = np.dot(np.linalg.inv(np.sqrt(np.diag(eigval))), eigvec.T)
  return m, P


def whitenlearn(X, qidxs, pidxs):
  m = X[:, qidxs].mean(axis=1, keepdims=True)
  df = X[:, qidxs] - X[:, pidxs]
  S = np.dot(df, df.T) / df.shape[1]
  P = np.linalg.inv(cholesky(S))
  df = np.dot(P, X - m)
  D = np.dot(df, df.T)
  eigval, eigvec = np.linalg.eig(D)
  order = eigval.argsort()[::-1]
  eigval = eigval[order]
  eigvec = eigvec[:, order]
  P = np.dot(eigvec.T, P)
  return m, P


def cholesky(S):
  alpha = 0
  while 1:
    try:
      return np.linalg.cholesky(S + alpha * np.eye(*S.shape))
    except np.linalg.LinAlgError:
      alpha = 1e-10 if alpha == 0 else alpha * 10


def same_rows_up_to_sign(a, b):
  """Eigenvectors are defined up to sign: b's rows flipped to agree with a's."""
  a, b = np.real(np.asarray(a, np.float64)), np.real(np.asarray(b, np.float64))
  signs = np.sign(np.sum(a * b, axis=1, keepdims=True))
  return b * np.where(signs == 0, 1, signs)


# ----------------------------------------------------------------------------------------------
# alpha-QE / alpha-DBA (rows are descriptors here, as in the project's API)


def _l2n(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def alpha_qe(queries, database, n, alpha):
  """q' = normalise(q + sum over the top-n database vectors d of max(q^T d, 0)^alpha d)."""
  queries, database = np.asarray(queries, np.float64), np.asarray(database, np.float64)
  out = []
  for q in queries:
    s = database @ q
    top = np.argsort(-s, kind='stable')[:n]
    out.append(q + (np.maximum(s[top, None], 0) ** alpha * database[top]).sum(axis=0))
  return _l2n(np.asarray(out))


def alpha_dba(database, n_with_itself, alpha):
  """Every database vector: normalise(its top-n neighbours, itself first, weighted max(x^T d, 0)^alpha).

  `n_with_itself` counts the vector itself (the paper's n_DBA neighbours + 1).
  """
  database = np.asarray(database, np.float64)
  out = []
  for x in database:
    s = database @ x
    top = np.argsort(-s, kind='stable')[:n_with_itself]
    out.append((np.maximum(s[top, None], 0) ** alpha * database[top]).sum(axis=0))
  return _l2n(np.asarray(out))
