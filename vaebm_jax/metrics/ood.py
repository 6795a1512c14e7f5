"""Out-of-distribution detection: AUROC of a score that is higher for in-distribution inputs
(VAEBM reports it for log h(x) = log p(x) − E(x), trained on one dataset and tested against others).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.stats


def _check_scores(name: str, scores: Any) -> np.ndarray:
  x = np.asarray(scores)
  if x.ndim != 1 or x.size == 0 or x.dtype.kind not in "biuf" or not np.isfinite(x).all():
    what = f"shape {x.shape}, dtype {x.dtype}"
    if x.ndim == 1 and x.size and x.dtype.kind in "biuf":
      what += f", {int(np.size(x) - np.isfinite(x).sum())} non-finite values"
    raise ValueError(f"auroc: {name} must be a non-empty 1-D array of finite numbers, got {what}")
  return x.astype(np.float64)


def auroc(scores_in: Any, scores_out: Any) -> float:
  """Area under the ROC curve of telling in-distribution from out-of-distribution inputs by a score.

  Equals the Mann–Whitney statistic P(s_in > s_out) + ½·P(s_in = s_out), i.e. sklearn's
  `roc_auc_score` with in-distribution as the positive class.

  Args:
    scores_in: (N,) scores of in-distribution inputs (higher = more in-distribution).
    scores_out: (M,) scores of out-of-distribution inputs.

  Returns:
    AUROC in [0, 1]: 1 when every in-score exceeds every out-score, 0.5 for identical distributions.

  Raises:
    ValueError: one line, when either input is not a non-empty 1-D array of finite numbers.
  """
  s_in, s_out = _check_scores("scores_in", scores_in), _check_scores("scores_out", scores_out)
  # Average ranks count a tie between an in- and an out-score as half a win.
  ranks = scipy.stats.rankdata(np.concatenate([s_in, s_out]))
  n_in, n_out = len(s_in), len(s_out)
  u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0
  return float(u / (n_in * n_out))
