"""Plots written next to a run's metrics: training curves and pass-rate histograms.

Single checkpoints of small models swing by 10-25 accuracy points between evaluations,
so every curve is drawn raw (faint) and smoothed by a centred moving average.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on TPU VMs or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
  """Centred moving average; the window shrinks at the ends instead of padding."""
  values = np.asarray(values, np.float64)
  if len(values) == 0 or window <= 1:
    return values
  half = window // 2
  cumsum = np.concatenate([[0.0], np.cumsum(values)])
  lo = np.clip(np.arange(len(values)) - half, 0, len(values))
  hi = np.clip(np.arange(len(values)) + half + 1, 0, len(values))
  return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  pairs = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
  if not pairs:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*pairs)
  return np.asarray(steps), np.asarray(values, np.float64)


def plot_curves(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str, *,
                window: int = 9, title: str = "", labels: Mapping[str, str] | None = None) -> str:
  """One panel per metric key over `step`: raw values faint, moving average bold."""
  labels = labels or {}
  keys = [k for k in keys if len(_series(rows, k)[0])]
  fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.5 * max(len(keys), 1), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    steps, values = _series(rows, key)
    ax.plot(steps, values, alpha=0.3, lw=1, color="C0")
    ax.plot(steps, moving_average(values, min(window, len(values))), lw=2, color="C0")
    ax.set_xlabel("step")
    ax.set_title(labels.get(key, key))
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_pass_rate_histogram(pass_rates: Sequence[float], num_samples: int, path: str, *,
                             title: str = "pass rate over prompts",
                             kept: tuple[float, float] | None = None) -> str:
  """Histogram with one bar per achievable pass rate (c / K for c = 0..K)."""
  counts = np.bincount(np.rint(np.asarray(pass_rates) * num_samples).astype(int),
                       minlength=num_samples + 1)
  fig, ax = plt.subplots(figsize=(5, 3.4))
  x = np.arange(num_samples + 1) / num_samples
  colors = ["C0"] * len(x)
  if kept is not None:
    colors = ["C0" if kept[0] <= v <= kept[1] else "C7" for v in x]
  ax.bar(x, counts, width=0.8 / num_samples, color=colors)
  ax.set_xlabel(f"pass rate ({num_samples} samples per prompt)")
  ax.set_ylabel("prompts")
  ax.set_title(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
