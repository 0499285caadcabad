"""Float64 NumPy restatement of ../shared/spec/losses.md (dense, O(P·N): for tests only)."""

import numpy as np


def step(x, delta):
  if delta == 0:
    return (x >= 0).astype(np.float64)
  return np.clip(x / (2 * delta) + 0.5, 0.0, 1.0)


def _split(logits, targets):
  s = np.asarray(logits, np.float64).ravel()
  y = np.asarray(targets, np.float64).ravel()
  pos = np.flatnonzero(y > 0)
  neg_all = np.flatnonzero(y == 0)
  return s, y, pos, neg_all


def _relevant(s, pos, neg, delta):
  tau = s[pos].min() - delta
  return neg[s[neg] >= tau]


def _errors(s, pos, ranking, sorting=None):
  """Per-entry (ranking, sorting) errors, zero outside positives."""
  out = np.zeros((2, len(s)))
  out[0, pos] = ranking
  if sorting is not None:
    out[1, pos] = sorting
  return out


def ap_loss(logits, targets, delta=1.0, return_errors=False):
  """Returns (loss, grad) of AP Loss, spec section 2; and the per-entry errors if asked."""
  s, _, pos, neg = _split(logits, targets)
  grad = np.zeros_like(s)
  if len(pos) == 0:
    return (0.0, grad, _errors(s, pos, [])) if return_errors else (0.0, grad)
  neg = _relevant(s, pos, neg, delta)
  n = len(pos)
  hpp = step(s[pos][None, :] - s[pos][:, None], delta)
  rank_plus = 1.0 + hpp.sum(1) - np.diag(hpp)
  hpn = step(s[neg][None, :] - s[pos][:, None], delta)  # [P, N]
  nfp = hpn.sum(1)
  rank = rank_plus + nfp
  p = rank_plus / rank
  order = np.argsort(s[pos], kind="stable")
  interp = np.zeros(n)
  weight = np.zeros(n)
  running = 0.0
  for i in order:
    if p[i] >= running:
      running = p[i]
      weight[i] = 1.0
    else:
      weight[i] = (1 - running) / (1 - p[i])
    interp[i] = running
  loss = 1 - interp.mean()
  grad[pos] = -(1 - interp) / n
  grad[neg] = (weight[:, None] * hpn / rank[:, None]).sum(0) / n
  if return_errors:
    return loss, grad, _errors(s, pos, 1 - interp)
  return loss, grad


def alrp_loss(logits, targets, loc_errors, delta=1.0, return_errors=False):
  """Returns (cls, loc, grad_logits, grad_loc) of aLRP Loss, spec section 3; and the per-entry
  errors if asked."""
  s, _, pos, neg = _split(logits, targets)
  e_all = np.asarray(loc_errors, np.float64).ravel()
  grad = np.zeros_like(s)
  grad_loc = np.zeros_like(s)
  if len(pos) == 0:
    out = (0.0, 0.0, grad, grad_loc)
    return out + (_errors(s, pos, []),) if return_errors else out
  neg = _relevant(s, pos, neg, delta)
  n = len(pos)
  e = e_all[pos]
  hpp = step(s[pos][None, :] - s[pos][:, None], delta)
  np.fill_diagonal(hpp, 0.0)
  rank_plus = 1.0 + hpp.sum(1)
  hpn = step(s[neg][None, :] - s[pos][:, None], delta)
  nfp = hpn.sum(1)
  rank = rank_plus + nfp
  cls = (nfp / rank).mean()
  ell = (hpp @ e + nfp) / rank
  active = nfp > 1e-5
  grad[pos] = np.where(active, -ell / n, 0.0)
  safe = np.where(active, nfp, 1.0)
  grad[neg] = (np.where(active, ell / safe, 0.0)[:, None] * hpn).sum(0) / n
  # descending logits; ties in the reverse of ascending stable order, as jaxrank does
  order = np.argsort(s[pos], kind="stable")[::-1]
  prefix = np.cumsum(e[order])
  loc = (prefix / rank[order]).sum() / n
  inv = np.cumsum((1.0 / rank[order])[::-1])[::-1] / n  # Σ_{m >= m'} 1/rank
  grad_loc[pos[order]] = inv
  if return_errors:
    return cls, loc, grad, grad_loc, _errors(s, pos, nfp / rank)
  return cls, loc, grad, grad_loc


def _rs_positive_part(s_pos, y_pos, delta):
  h = step(s_pos[None, :] - s_pos[:, None], delta)  # h[i, k] = H(s_k - s_i)
  rank_plus = h.sum(1)
  current = (h * (1 - y_pos)[None, :]).sum(1) / rank_plus
  t = h * (y_pos[None, :] >= y_pos[:, None])
  target = (t * (1 - y_pos)[None, :]).sum(1) / t.sum(1)
  se = current - target
  m = h * (y_pos[None, :] < y_pos[:, None])  # m[i, k]: k above i with lower IoU
  d = m.sum(1)
  has_d = d > 1e-10
  col = (np.where(has_d, se / np.where(has_d, d, 1.0), 0.0)[:, None] * m).sum(0)
  sorting_grad = -np.where(has_d, se, 0.0) + col
  return rank_plus, se, sorting_grad


def _rs_like(s, pos, neg_stats, y_pos, delta, sorting=True):
  """neg_stats: (hpn [P, K], member weights [K]) for K negatives or buckets."""
  n = len(pos)
  if sorting:
    rank_plus, se, sorting_grad = _rs_positive_part(s[pos], y_pos, delta)
  else:
    rank_plus = step(s[pos][None, :] - s[pos][:, None], delta).sum(1)
    se = sorting_grad = np.zeros(n)
  hpn, weights = neg_stats
  nfp = (hpn * weights[None, :]).sum(1)
  rank = rank_plus + nfp
  re = nfp / rank
  has_fp = nfp > 1e-10
  grad_pos = (-np.where(has_fp, re, 0.0) + sorting_grad) / n
  grad_neg = (np.where(has_fp, re / np.where(has_fp, nfp, 1.0), 0.0)[:, None] * hpn).sum(0) / n
  return re.mean(), se.mean(), grad_pos, grad_neg, (re, se)


def rank_sort_loss(logits, targets, delta=0.5, return_errors=False):
  """Returns (ranking, sorting, grad) of RS Loss, spec section 4; and the errors if asked."""
  s, y, pos, neg = _split(logits, targets)
  grad = np.zeros_like(s)
  if len(pos) == 0:
    return (0.0, 0.0, grad, _errors(s, pos, [])) if return_errors else (0.0, 0.0, grad)
  neg = _relevant(s, pos, neg, delta)
  hpn = step(s[neg][None, :] - s[pos][:, None], delta)
  ranking, sorting, gp, gn, (re, se) = _rs_like(s, pos, (hpn, np.ones(len(neg))), y[pos], delta)
  grad[pos] = gp
  grad[neg] = gn
  if return_errors:
    return ranking, sorting, grad, _errors(s, pos, re, se)
  return ranking, sorting, grad


def buckets(logits, targets, delta):
  """Bucket of each relevant negative: stable lexsort by (-s, is_positive), spec 5.6."""
  s, y, pos, neg = _split(logits, targets)
  neg = _relevant(s, pos, neg, delta)
  ids = np.array([(s[pos] > s[j]).sum() for j in neg], dtype=int)
  return neg, ids


def bucketed_loss(logits, targets, delta, sorting, return_errors=False):
  """Returns (ranking, sorting, grad) of bucketed RS (sorting=True) or bucketed AP, spec 5; and
  the per-entry errors if asked."""
  s, y, pos, _ = _split(logits, targets)
  grad = np.zeros_like(s)
  if len(pos) == 0:
    return (0.0, 0.0, grad, _errors(s, pos, [])) if return_errors else (0.0, 0.0, grad)
  neg, ids = buckets(logits, targets, delta)
  labels = np.unique(ids)
  sizes = np.array([(ids == b).sum() for b in labels], np.float64)
  means = np.array([s[neg[ids == b]].mean() for b in labels])
  hpb = step(means[None, :] - s[pos][:, None], delta) if len(labels) else np.zeros((len(pos), 0))
  ranking, sort, gp, gb, (re, se) = _rs_like(s, pos, (hpb, sizes), y[pos], delta, sorting=sorting)
  grad[pos] = gp
  for b, g in zip(labels, gb):
    grad[neg[ids == b]] = g  # bucket total n_b·g / n_b per member
  if return_errors:
    return ranking, sort, grad, _errors(s, pos, re, se)
  return ranking, sort, grad


def ranking_errors(name, logits, targets, delta, loc_errors=None):
  """``(loss value, [2, N] per-entry ranking and sorting errors)`` of loss ``name``."""
  if name == "ap":
    loss, _, errors = ap_loss(logits, targets, delta, return_errors=True)
    return loss, errors
  if name == "alrp":
    loc = np.zeros(np.size(logits)) if loc_errors is None else loc_errors
    cls, _, _, _, errors = alrp_loss(logits, targets, loc, delta, return_errors=True)
    return cls, errors
  if name == "rank_sort":
    ranking, sorting, _, errors = rank_sort_loss(logits, targets, delta, return_errors=True)
  else:
    ranking, sorting, _, errors = bucketed_loss(logits, targets, delta,
                                                name == "bucketed_rank_sort", return_errors=True)
  return ranking + sorting, errors
