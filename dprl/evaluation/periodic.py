"""Held-out evaluation during training, as a hook the training loop calls after each step.

A single greedy evaluation of a small model swings by 10-25 points from one checkpoint
to the next (shared/docs/tiny-rl-facts.md), so the hook evaluates the same fixed items
every `every` steps and the curves it feeds are smoothed downstream (`dprl.plots`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dprl.data.records import Record
from dprl.data.templates import TemplateConfig
from dprl.evaluation.metrics import summarize
from dprl.evaluation.rollout import rollout_records


class PeriodicEval:
  """Evaluates `records` every `every` steps (and at step 0); returns metrics to log.

  Metrics (prefix "eval/"): accuracy (mean pass rate over the items: greedy accuracy at
  temperature 0), accuracy_stderr, response_len, and accuracy_level_<L> per level.
  """

  def __init__(self, records: Sequence[Record], tokenizer, *, every: int, template: TemplateConfig,
               max_new_tokens: int, batch_size: int = 64, num_samples: int = 1,
               temperature: float = 0.0, min_pixels: int, max_pixels: int,
               reward_fn: str = "math", reward_params: Mapping[str, Any] | None = None,
               seed: int = 0, prefix: str = "eval/"):
    if every < 1:
      raise ValueError(f"eval.every must be >= 1, got {every}")
    self.records = list(records)
    self.tokenizer = tokenizer
    self.every = every
    self.prefix = prefix
    self.kwargs = dict(template=template, num_samples=num_samples, max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=batch_size, seed=seed,
                       min_pixels=min_pixels, max_pixels=max_pixels, reward_fn=reward_fn,
                       reward_params=dict(reward_params or {}), progress=False)

  def due(self, step: int, final: bool = False) -> bool:
    return step % self.every == 0 or final

  def __call__(self, step: int, model, final: bool = False) -> dict[str, float]:
    if not self.due(step, final):
      return {}
    results = rollout_records(model, self.tokenizer, self.records, **self.kwargs)
    summary = summarize(results)
    p = self.prefix
    out = {f"{p}accuracy": float(summary["accuracy"]),
           f"{p}accuracy_stderr": float(summary.get("accuracy_stderr") or 0.0),
           f"{p}response_len": float(summary.get("mean_response_length") or 0.0)}
    for level, group in summary["by_level"].items():
      out[f"{p}accuracy_level_{level}"] = float(group["accuracy"])
    return out


class EvalSuite:
  """Several PeriodicEvals as one hook: their metrics merged (each has its own prefix)."""

  def __init__(self, evaluators: Sequence[PeriodicEval]):
    prefixes = [e.prefix for e in evaluators]
    if len(set(prefixes)) != len(prefixes):
      raise ValueError(f"evaluators share a metric prefix: {prefixes}")
    self.evaluators = list(evaluators)

  def __call__(self, step: int, model, final: bool = False) -> dict[str, float]:
    out: dict[str, float] = {}
    for evaluator in self.evaluators:
      out.update(evaluator(step, model, final=final))
    return out
