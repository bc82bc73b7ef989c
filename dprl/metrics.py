"""Training metrics: one JSON line per step, TensorBoard scalars, and a progress bar.

    writer = MetricsWriter(workdir, resume_step=restored_step)
    writer.write(step, {"loss": 0.12, "reward_mean": 0.4})   # -> metrics.jsonl + events
    writer.close()

Only process 0 writes (every process may call); other processes get no-op writers, so
training code needs no `if jax.process_index() == 0`.

Resuming: rows of steps after `resume_step` (written by a run that died before its next
checkpoint) are dropped from metrics.jsonl first, so every step appears exactly once.
Non-finite values are written as JSON `NaN` / `Infinity` (what Python's json and pandas
read), so a diverged step stays visible in the log.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

JSONL_NAME = "metrics.jsonl"


def _scalar(value: Any) -> Any:
  """A JSON-friendly Python scalar for numbers and 0-d arrays; other values unchanged."""
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    value = np.asarray(value).item()
  if isinstance(value, np.generic):
    value = value.item()
  return value


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl file (or of `path/metrics.jsonl` for a folder)."""
  if os.path.isdir(path):
    path = os.path.join(path, JSONL_NAME)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
  if len(keep) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)


class MetricsWriter:
  """Appends step metrics to `workdir/metrics.jsonl` and TensorBoard event files.

  Args:
    workdir: the run's folder.
    tensorboard: also write TensorBoard events (to `workdir/tensorboard`).
    resume_step: the step training resumes after; later rows are dropped. None: keep all.
    prefix: TensorBoard tag prefix (e.g. "train/").
    enabled: None -> only on process 0.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None,
               prefix: str = "train/", jsonl_name: str = JSONL_NAME,
               enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, jsonl_name)
    self.prefix = prefix
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      _truncate_after(self.path, resume_step)
    self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """One row: {"step": step, **metrics}; numbers only go to TensorBoard."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({key: _scalar(value) for key, value in metrics.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(self.prefix + key, value, int(step))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def non_finite(metrics: Mapping[str, Any]) -> list[str]:
  """Names of metrics whose value is NaN or infinite."""
  bad = []
  for key, value in metrics.items():
    value = _scalar(value)
    if isinstance(value, float) and not math.isfinite(value):
      bad.append(key)
  return bad


def progress_bar(total: int, initial: int = 0, *, enabled: bool | None = None,
                 description: str = "train"):
  """A tqdm bar over steps (disabled off process 0); `bar.set_postfix(loss=...)`."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  enabled = jax.process_index() == 0 if enabled is None else enabled
  return tqdm(total=total, initial=initial, desc=description, disable=not enabled,
              dynamic_ncols=True, unit="step")


def postfix(metrics: Mapping[str, Any], keys=("loss", "reward_mean", "accuracy")) -> dict:
  """The few metrics a progress bar shows, rounded."""
  return {key: f"{float(metrics[key]):.4g}" for key in keys if key in metrics}
