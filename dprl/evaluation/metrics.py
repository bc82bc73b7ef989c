"""Metrics over scored rollouts: accuracy overall, by level and by source, pass@k, lengths.

    summary = summarize(results, ks=(1, 4))
    print(format_table(summary))

Accuracy is the mean over items of each item's fraction of correct responses (mean@K, the
expected pass@1), so items weigh equally whatever K; its standard error is the spread
of the item pass rates over sqrt(items). pass@k is the unbiased estimator of Chen et al.
2021 (arXiv 2107.03374, eq. 1) averaged over items: with n responses of which c are
correct, `1 - C(n - c, k) / C(n, k)`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dprl.evaluation.rollout import ItemResult

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k of one item with `c` of `n` responses correct.

  Computed as `1 - prod_{i=n-c+1}^{n} (1 - k / i)`, the same ratio of binomials without
  the overflow of large factorials (Chen et al. 2021's numerically stable form).
  """
  if not 0 <= c <= n:
    raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"pass@{k} needs 1 <= k <= n responses, got n={n}")
  if n - c < k:  # every k-subset holds a correct response
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _mean(values: Iterable[float]) -> float | None:
  values = list(values)
  return float(np.mean(values)) if values else None


def group_metrics(results: Sequence[ItemResult], ks: Sequence[int]) -> dict[str, Any]:
  """Metrics of one group of items; `ks` already checked against the sample counts.

  Returns a dict with num_items, accuracy, accuracy_stderr, pass@k for each k,
  mean_reward and mean_response_length (None where the group is empty).
  """
  rates = np.asarray([r.pass_rate for r in results], np.float64)
  stderr = float(rates.std(ddof=1) / np.sqrt(len(rates))) if len(rates) > 1 else None
  metrics: dict[str, Any] = {
      "num_items": len(results),
      "accuracy": _mean(rates),
      "accuracy_stderr": stderr,
  }
  for k in ks:
    metrics[f"pass@{k}"] = _mean(pass_at_k(r.num_samples, r.num_correct, k) for r in results)
  metrics["mean_reward"] = _mean(x for r in results for x in r.rewards)
  metrics["mean_response_length"] = _mean(n for r in results for n in r.response_lengths)
  return metrics


def _level_key(level: int | None) -> str:
  return "none" if level is None else str(level)


def _level_order(key: str) -> tuple[int, float | str]:
  try:
    return (0, float(key))
  except ValueError:
    return (1, key)


def summarize(results: Sequence[ItemResult], ks: Sequence[int] = (1,)) -> dict[str, Any]:
  """Accuracy, pass@k, reward and response length, overall and per level and source.

  Args:
    results: scored items (`rollout_records`).
    ks: pass@k values of k; those above the smallest item's sample count are dropped
      (with a warning), since pass@k needs k responses.

  Returns:
    A JSON-serialisable dict: `group_metrics` of all items, plus `num_samples` (the
    smallest per-item sample count), `ks` (the k reported), `by_level` and `by_source`
    (group key -> `group_metrics`; levels in numeric order, "none" for no level).
  """
  ks = sorted({int(k) for k in ks})
  if any(k < 1 for k in ks):
    raise ValueError(f"pass@k needs k >= 1, got ks={ks}")
  num_samples = min((r.num_samples for r in results), default=0)
  dropped = [k for k in ks if k > num_samples]
  if dropped and results:
    log.warning("pass@k for k=%s dropped: items have only %d responses", dropped, num_samples)
  ks = [k for k in ks if k <= num_samples]

  by_level: dict[str, list[ItemResult]] = {}
  by_source: dict[str, list[ItemResult]] = {}
  for result in results:
    by_level.setdefault(_level_key(result.level), []).append(result)
    by_source.setdefault(result.source, []).append(result)
  summary = group_metrics(results, ks)
  summary.update({
      "num_samples": num_samples,
      "ks": ks,
      "by_level": {key: group_metrics(by_level[key], ks)
                   for key in sorted(by_level, key=_level_order)},
      "by_source": {key: group_metrics(by_source[key], ks) for key in sorted(by_source)},
  })
  return summary


def _cell(value: float | None, digits: int = 3) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
  """`summarize`'s dict as a plain-text table: one row overall, per level, per source."""
  pass_columns = [f"pass@{k}" for k in summary.get("ks", [])]
  header = ["group", "items", "accuracy", "stderr", *pass_columns, "reward", "length"]
  rows = [("all", summary)]
  rows += [(f"level={key}", metrics) for key, metrics in summary.get("by_level", {}).items()]
  rows += [(f"source={key}", metrics) for key, metrics in summary.get("by_source", {}).items()]
  table = [header]
  for name, metrics in rows:
    table.append([name, str(metrics["num_items"]), _cell(metrics["accuracy"]),
                  _cell(metrics["accuracy_stderr"]),
                  *(_cell(metrics[column]) for column in pass_columns),
                  _cell(metrics["mean_reward"]), _cell(metrics["mean_response_length"], 1)])
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = []
  for number, row in enumerate(table):
    cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
    lines.append("  ".join(cells))
    if number == 0:
      lines.append("  ".join("-" * w for w in widths))
  title = (f"{summary['num_items']} items x {summary.get('num_samples', '?')} samples; "
           "accuracy = mean per-item pass rate")
  return title + "\n" + "\n".join(lines)
