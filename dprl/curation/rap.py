"""RAP data selection (arXiv 2506.04755): the causal-discrepancy and attention-confidence
filters and the difficulty-aware replacement, as pure functions of per-sample scores.

Each sample is measured once (`SampleScore`, written as one JSON line as soon as it is
known, so a long run can resume); `select` then decides on the whole set:

  CDE  `D = acc_mm - acc_text` from M rollouts with the image and M with the question
       alone; keep `D > cde_threshold` (the released code's 0.2). A small D means the
       question is answerable from language priors.
  ACE  keep samples whose largest attention confidence over uninformative response tokens
       is at most `ace_lambda` (`dprl.curation.attention_confidence` measures it). The
       comparison is made in log space, since psi underflows float64 on long responses.
  DRM  survivors of CDE and ACE that are always right (difficulty 0: every multimodal
       rollout correct) give no GRPO signal; they are replaced, top-k by difficulty, by
       the hardest samples not yet selected that pass ACE and whose error rate is in
       [1/M, 1) (at least one rollout right and one wrong).

What the paper leaves open, and dprl's choice:
  * The replacement pool. Every CDE+ACE survivor is already selected, so the pool is the
    rest: samples CDE removed (ACE must still pass). Hardest first: highest error rate,
    then largest D, then id (deterministic).
  * The target size. By default the number of CDE+ACE survivors, so DRM swaps samples one
    for one; `target_size` sets it explicitly. DRM only adds and swaps, it never
    subsamples: a target below the non-trivial survivors removes nothing more.
  * A pool too small to fill the target. The trivial samples come back (largest D first)
    until the target is met (`refill_with_trivial`), so the subset keeps its size; with
    False the subset is simply smaller. The report counts both.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Final reasons, one per sample (`Decision.reason`).
SELECTED = "selected"  # passed CDE and ACE, not trivial
DRM_REPLACEMENT = "drm_replacement"  # added by DRM from the pool
DRM_REFILL = "drm_refill"  # trivial, kept because the pool ran short
REMOVED_CDE = "cde"  # D <= cde_threshold (and not added back by DRM)
REMOVED_ACE = "ace"  # passed CDE, failed ACE
REMOVED_TRIVIAL = "drm_trivial"  # passed CDE and ACE, always right, replaced
REASONS = (SELECTED, DRM_REPLACEMENT, DRM_REFILL, REMOVED_CDE, REMOVED_ACE, REMOVED_TRIVIAL)
KEPT_REASONS = (SELECTED, DRM_REPLACEMENT, DRM_REFILL)


@dataclasses.dataclass(frozen=True)
class SampleScore:
  """What the estimators measured on one sample (one line of the scores JSONL).

  Attributes:
    id: the record id.
    num_mm, mm_correct: multimodal rollouts (M) and how many were correct.
    num_text, text_correct: question-only rollouts and how many were correct.
    log_max_psi: log of the largest attention confidence psi_j over the uninformative
      tokens of the teacher-forced response; -inf when it has none (or psi is 0).
    max_psi_token: the decoded token attaining it ("" when none), for inspection.
    source, level: the record's, for per-source breakdowns.
    language_prior: `record.metadata["language_prior"]` where present (the synthetic
      benchmark marks items answerable without the image), else None.
  """

  id: str
  num_mm: int
  mm_correct: int
  num_text: int
  text_correct: int
  log_max_psi: float = -math.inf
  max_psi_token: str = ""
  source: str = "unknown"
  level: int | None = None
  language_prior: bool | None = None

  def __post_init__(self):
    for total, correct in (("num_mm", "mm_correct"), ("num_text", "text_correct")):
      n, c = getattr(self, total), getattr(self, correct)
      if n < 1 or not 0 <= c <= n:
        raise ValueError(f"sample {self.id!r}: {correct}={c} must be in [0, {total}={n}] "
                         f"and {total} >= 1")
    if math.isnan(self.log_max_psi):
      raise ValueError(f"sample {self.id!r}: log_max_psi is NaN")

  @property
  def acc_mm(self) -> float:
    return self.mm_correct / self.num_mm

  @property
  def acc_text(self) -> float:
    return self.text_correct / self.num_text

  @property
  def discrepancy(self) -> float:
    """CDE's D = acc_mm - acc_text, in [-1, 1].

    One division of exact integers, so D is the double nearest the rational k / (M M')
    and compares with a threshold like 0.2 as the rational does (9/10 - 7/10 computed as
    a difference of floats is 0.20000000000000007 > 0.2).
    """
    numerator = self.mm_correct * self.num_text - self.text_correct * self.num_mm
    return numerator / (self.num_mm * self.num_text)

  @property
  def error_rate(self) -> float:
    """The multimodal difficulty, 1 - acc_mm."""
    return (self.num_mm - self.mm_correct) / self.num_mm

  @property
  def max_psi(self) -> float:
    return math.exp(self.log_max_psi)

  def to_json(self) -> dict[str, Any]:
    """The JSON row: the fields, plus the derived acc_mm, acc_text, D and max_psi.

    -inf is written as JSON `-Infinity` (Python's json and pandas read it).
    """
    row = dataclasses.asdict(self)
    row.update(acc_mm=self.acc_mm, acc_text=self.acc_text, D=self.discrepancy,
               max_psi=self.max_psi)
    return row

  @classmethod
  def from_json(cls, row: Mapping[str, Any]) -> SampleScore:
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(n for n in ("id", "num_mm", "mm_correct", "num_text", "text_correct")
                     if n not in row)
    if missing:
      raise ValueError(f"score row {row.get('id', '?')!r}: missing fields {missing}")
    return cls(**{k: v for k, v in row.items() if k in names})


def passes_cde(score: SampleScore, threshold: float) -> bool:
  """Strictly above the threshold, as the released code (`D > 0.2`)."""
  return score.discrepancy > threshold


def passes_ace(score: SampleScore, lambda_a: float) -> bool:
  """No uninformative token has psi above lambda_a (compared as logs)."""
  if lambda_a <= 0:
    raise ValueError(f"ace lambda must be > 0, got {lambda_a}")
  return not score.log_max_psi > math.log(lambda_a)


def is_trivial(score: SampleScore) -> bool:
  """Difficulty 0: every multimodal rollout was correct."""
  return score.mm_correct == score.num_mm


def is_hard(score: SampleScore) -> bool:
  """Error rate in [1/M, 1): at least one multimodal rollout wrong and one right."""
  return 0 < score.mm_correct < score.num_mm


def hardness_key(score: SampleScore) -> tuple[float, float, str]:
  """Sort key, hardest first: error rate, then D (more image-dependent), then id."""
  return (-score.error_rate, -score.discrepancy, score.id)


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  """Which estimators run and their thresholds (configs/rap.py's `select` block).

  Attributes:
    use_cde, cde_threshold: keep D > cde_threshold.
    use_ace, ace_lambda: drop samples with max psi over uninformative tokens > ace_lambda.
    use_drm: replace trivial survivors by the hardest ACE-passing samples of the pool.
    target_size: the subset size DRM fills to; None: the number of CDE+ACE survivors.
    refill_with_trivial: if the pool runs short, keep trivial samples to reach the target.
  """

  use_cde: bool = True
  cde_threshold: float = 0.2
  use_ace: bool = True
  ace_lambda: float = 0.1
  use_drm: bool = True
  target_size: int | None = None
  refill_with_trivial: bool = True

  def __post_init__(self):
    if not -1.0 <= self.cde_threshold < 1.0:
      raise ValueError(f"cde_threshold must be in [-1, 1) (D is in [-1, 1]), got "
                       f"{self.cde_threshold}")
    if self.ace_lambda <= 0:
      raise ValueError(f"ace_lambda must be > 0, got {self.ace_lambda}")
    if self.target_size is not None and self.target_size < 0:
      raise ValueError(f"target_size must be >= 0 or None, got {self.target_size}")


@dataclasses.dataclass(frozen=True)
class Decision:
  """One sample's outcome: the tests it passed and the final reason (see `REASONS`)."""

  score: SampleScore
  cde_pass: bool
  ace_pass: bool
  trivial: bool
  reason: str

  @property
  def kept(self) -> bool:
    return self.reason in KEPT_REASONS

  def to_json(self) -> dict[str, Any]:
    return {**self.score.to_json(), "cde_pass": self.cde_pass, "ace_pass": self.ace_pass,
            "trivial": self.trivial, "kept": self.kept, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Selection:
  """The outcome of `select`.

  Attributes:
    selected: ids in the subset: survivors in input order, then DRM replacements
      hardest first, then trivial refills.
    decisions: one per input score, in input order.
    report: counts (see `select`).
  """

  selected: list[str]
  decisions: list[Decision]
  report: dict[str, int]


def select(scores: Sequence[SampleScore], config: SelectionConfig = SelectionConfig()
           ) -> Selection:
  """Applies CDE, ACE and DRM to measured samples.

  The report counts: total; removed_by_cde (D <= threshold); removed_by_ace (passed CDE,
  failed ACE); ace_flagged (failed ACE, whatever CDE said); survivors (passed both);
  trivial_removed; replacement_pool (hard, ACE-passing, not survivors); replaced (added
  from the pool); refilled (trivial kept back); shortfall (target minus subset size,
  when neither pool nor refill can fill it); selected.
  """
  duplicates = sorted(i for i, n in collections.Counter(s.id for s in scores).items() if n > 1)
  if duplicates:
    raise ValueError(f"duplicate sample ids in scores: {duplicates[:10]}")
  cde = [passes_cde(s, config.cde_threshold) if config.use_cde else True for s in scores]
  ace = [passes_ace(s, config.ace_lambda) if config.use_ace else True for s in scores]
  trivial = [is_trivial(s) for s in scores]
  survivors = [i for i in range(len(scores)) if cde[i] and ace[i]]
  # The first test failed; DRM rewrites the reasons of the samples it moves.
  reason = {i: REMOVED_CDE if not cde[i] else REMOVED_ACE if not ace[i] else SELECTED
            for i in range(len(scores))}

  pool: list[int] = []
  removed: list[int] = []
  replaced: list[int] = []
  refilled: list[int] = []
  target = len(survivors) if config.target_size is None else config.target_size
  if config.use_drm:
    survivor_set = set(survivors)
    kept = [i for i in survivors if not trivial[i]]
    removed = [i for i in survivors if trivial[i]]
    pool = sorted((i for i in range(len(scores))
                   if i not in survivor_set and ace[i] and is_hard(scores[i])),
                  key=lambda i: hardness_key(scores[i]))
    need = max(0, target - len(kept))
    replaced = pool[:need]
    if config.refill_with_trivial:
      removed.sort(key=lambda i: (-scores[i].discrepancy, scores[i].id))
      refilled = removed[:max(0, need - len(replaced))]
    for i in removed:
      reason[i] = REMOVED_TRIVIAL
    for i in replaced:
      reason[i] = DRM_REPLACEMENT
    for i in refilled:
      reason[i] = DRM_REFILL
    order = kept + replaced + refilled
  else:
    order = survivors

  decisions = [Decision(s, cde[i], ace[i], trivial[i], reason[i]) for i, s in enumerate(scores)]
  report = {
      "total": len(scores),
      "removed_by_cde": sum(not c for c in cde),
      "removed_by_ace": sum(c and not a for c, a in zip(cde, ace)),
      "ace_flagged": sum(not a for a in ace),
      "survivors": len(survivors),
      "trivial_removed": len(removed),
      "replacement_pool": len(pool),
      "replaced": len(replaced),
      "refilled": len(refilled),
      "target": target,
      "shortfall": max(0, target - len(order)) if config.use_drm else 0,
      "selected": len(order),
  }
  return Selection([scores[i].id for i in order], decisions, report)


def report_table(report: Mapping[str, int]) -> str:
  """The report as an aligned two-column text table, for the console."""
  labels = {
      "total": "samples scored",
      "removed_by_cde": "removed by CDE (D <= threshold)",
      "removed_by_ace": "removed by ACE (after CDE)",
      "ace_flagged": "flagged by ACE (all samples)",
      "survivors": "survivors of CDE + ACE",
      "trivial_removed": "DRM: trivial (always right) taken out",
      "replacement_pool": "DRM: hard ACE-passing pool",
      "replaced": "DRM: replacements added",
      "refilled": "DRM: trivial kept back (pool short)",
      "target": "target size",
      "shortfall": "shortfall",
      "selected": "selected",
  }
  rows = [(labels.get(k, k), str(v)) for k, v in report.items()]
  width = max(len(r[0]) for r in rows)
  lines = [f"{'estimator / step':<{width}}  count", "-" * (width + 7)]
  lines += [f"{name:<{width}}  {value:>5}" for name, value in rows]
  return "\n".join(lines)


def read_scores(path) -> list[SampleScore]:
  """Scores from a JSONL file, in file order; a truncated last line (a crash mid-write)
  is ignored, a repeated id keeps its last row."""
  by_id: dict[str, SampleScore] = {}
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines):  # only the unterminated last line may be cut short
        break
      raise ValueError(f"{path}:{number}: not a JSON line") from None
    score = SampleScore.from_json(row)
    by_id.pop(score.id, None)
    by_id[score.id] = score
  return list(by_id.values())


def append_scores(path, scores: Iterable[SampleScore]) -> None:
  """Appends rows and flushes, so a crash loses at most the line being written."""
  with open(path, "a", encoding="utf-8") as f:
    for score in scores:
      f.write(json.dumps(score.to_json(), ensure_ascii=False) + "\n")
    f.flush()
