"""Difficulty from pass rates: the difficulty prior's offline curation (arXiv 2505.13261).

Each prompt is sampled K times with the base model; its `c` correct answers out of K give
its pass rate `c / K`, its difficulty. Over a dataset the pass rates are U-shaped (many
prompts always right, many never right). Curation

  1. drops prompts whose pass rate lies outside an interval [low, high] (the paper keeps
     about [0.1, 0.87]); never-right and always-right prompts are always dropped, since
     every answer in their GRPO group has the same reward and so zero advantage;
  2. splits the kept prompts into stage 1 (moderate) and stage 2 (the hardest: moderate
     to hard), by a registered rule (`SPLIT_RULES`: a fraction, a size, or a pass-rate
     cut) applied to the prompts ranked by pass rate;
  3. flags the stage-2 prompts whose pass rate is below a threshold for a difficulty hint
     (`metadata["hint"] = True`), with the same strict comparison as the
     `difficulty_hint` prompt template, so training that template on the curated records
     with `hint_template_config(...)` adds the sentence to exactly the flagged prompts.

Intervals for any K. A float interval means different things at different K (at K = 4
the only possible rates are 0, 1/4, 1/2, 3/4, 1), so [low, high] is turned into bounds on
the number of correct answers (`correct_bounds`):

    min_correct = max(1,     ceil(low * K))     fewest correct answers kept
    max_correct = min(K - 1, floor(high * K))   most correct answers kept

that is, exactly the counts whose pass rate c/K lies in [low, high], clipped to [1, K-1]
so the two ends are dropped whatever the interval. (A 1e-9 slack absorbs float error in
`low * K`, so that low = 0.125 at K = 8 gives 1, not 2.) With the default [0.1, 0.87]:
K = 8 keeps 1..6 correct (pass rates 0.125..0.75; 7/8 = 0.875 is above 0.87), K = 16
keeps 2..13, K = 4 keeps 1..3, K = 2 keeps exactly 1. K = 1 can keep nothing and is an
error. Either bound may also be given directly as a count.

Everything here is pure: scores in, records out; `dprl.curate` does the sampling and I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dprl.data import templates
from dprl.data.records import Record
from dprl.rl.registry import Registry

# Reasons a prompt is dropped (keys of `Curation.dropped`), and the stages it can go to.
NEVER_RIGHT = "never_right"
ALWAYS_RIGHT = "always_right"
BELOW_INTERVAL = "below_interval"  # some right answers, but fewer than min_correct
ABOVE_INTERVAL = "above_interval"  # some wrong answers, but fewer than K - max_correct
DROP_REASONS = (NEVER_RIGHT, BELOW_INTERVAL, ABOVE_INTERVAL, ALWAYS_RIGHT)
STAGES = ("stage1", "stage2")

# The paper's reported interval (methods.md); its K is not stated.
DEFAULT_LOW, DEFAULT_HIGH = 0.1, 0.87
# Slack for float error in `low * K` and `high * K` (see the module docstring).
_SLACK = 1e-9


class CurationError(ValueError):
  """A curation setting or input that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Score:
  """One prompt's result: `num_correct` of `num_samples` sampled answers were right."""

  id: str
  num_correct: int
  num_samples: int

  def __post_init__(self):
    if self.num_samples < 1:
      raise CurationError(f"prompt {self.id!r}: num_samples must be >= 1, "
                          f"got {self.num_samples}")
    if not 0 <= self.num_correct <= self.num_samples:
      raise CurationError(f"prompt {self.id!r}: num_correct must be in [0, "
                          f"{self.num_samples}], got {self.num_correct}")

  @property
  def pass_rate(self) -> float:
    # Always computed this one way, so the value stored in `Record.pass_rate` and the
    # value the hint threshold was compared with are the same float.
    return self.num_correct / self.num_samples


# ------------------------------------------------------------------ the kept interval


@dataclasses.dataclass(frozen=True)
class CorrectBounds:
  """Prompts with min_correct <= num_correct <= max_correct of num_samples are kept."""

  num_samples: int
  min_correct: int
  max_correct: int

  def __post_init__(self):
    k = self.num_samples
    if k < 2:
      raise CurationError(f"num_samples must be >= 2 to tell moderate prompts from "
                          f"never-right and always-right ones, got {k}")
    if not 1 <= self.min_correct <= self.max_correct <= k - 1:
      raise CurationError(
          f"need 1 <= min_correct <= max_correct <= num_samples - 1 = {k - 1}, got "
          f"min_correct={self.min_correct}, max_correct={self.max_correct}")

  @property
  def low(self) -> float:
    """The lowest pass rate kept."""
    return self.min_correct / self.num_samples

  @property
  def high(self) -> float:
    """The highest pass rate kept."""
    return self.max_correct / self.num_samples

  def keeps(self, num_correct: int) -> bool:
    return self.min_correct <= num_correct <= self.max_correct

  def drop_reason(self, num_correct: int) -> str | None:
    """Why a prompt with `num_correct` right answers is dropped, or None if kept."""
    if num_correct == 0:
      return NEVER_RIGHT
    if num_correct == self.num_samples:
      return ALWAYS_RIGHT
    if num_correct < self.min_correct:
      return BELOW_INTERVAL
    if num_correct > self.max_correct:
      return ABOVE_INTERVAL
    return None


def correct_bounds(num_samples: int, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH,
                   min_correct: int | None = None,
                   max_correct: int | None = None) -> CorrectBounds:
  """The counts of correct answers (of `num_samples`) whose pass rate is in [low, high].

  See the module docstring for the derivation. `min_correct` / `max_correct`, when given,
  replace the bound derived from `low` / `high`.
  """
  if not 0.0 <= low <= high <= 1.0:
    raise CurationError(f"filter interval must satisfy 0 <= low <= high <= 1, got "
                        f"low={low}, high={high}")
  if num_samples < 2:
    raise CurationError(f"num_samples must be >= 2 to tell moderate prompts from "
                        f"never-right and always-right ones, got {num_samples}")
  if min_correct is None:
    min_correct = max(1, math.ceil(low * num_samples - _SLACK))
  if max_correct is None:
    max_correct = min(num_samples - 1, math.floor(high * num_samples + _SLACK))
  if min_correct > max_correct:
    raise CurationError(
        f"filter interval [low={low}, high={high}] keeps no prompts at num_samples="
        f"{num_samples}: min_correct={min_correct} > max_correct={max_correct} (pass "
        f"rates are multiples of 1/{num_samples}; widen the interval or sample more)")
  return CorrectBounds(num_samples, min_correct, max_correct)


def histogram(num_correct: Sequence[int] | np.ndarray, num_samples: int) -> np.ndarray:
  """[num_samples + 1] int64: how many prompts got 0, 1, ..., num_samples right."""
  counts = np.asarray(num_correct, np.int64).reshape(-1)
  if counts.size and (counts.min() < 0 or counts.max() > num_samples):
    raise CurationError(f"num_correct must be in [0, {num_samples}], got values in "
                        f"[{counts.min()}, {counts.max()}]")
  return np.bincount(counts, minlength=num_samples + 1)


# ------------------------------------------------------------------ stage split


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """How the kept prompts are split into stage 1 and stage 2 (`SPLIT_RULES[rule]`).

  Attributes:
    rule: "fraction" (the hardest `stage2_fraction` of the kept prompts, rounded half
      up), "size" (the
      hardest `stage2_size`, or all if fewer) or "pass_rate" (those with pass rate <=
      `stage2_max_pass_rate`). Stage 1 gets the rest.
    stage2_fraction: 0.23 ~ 0.6K / (2K + 0.6K), the paper's stage sizes.
    stage2_size: the paper's 600.
    stage2_max_pass_rate: a pass-rate cut, for "pass_rate".
    seed: breaks ties between equal pass rates (by a hash of the prompt id, so the split
      does not depend on the order of the data).
  """

  rule: str = "fraction"
  stage2_fraction: float = 0.23
  stage2_size: int = 600
  stage2_max_pass_rate: float = 0.5
  seed: int = 0


# A split rule: (pass rates of the kept prompts, ascending [N], config) -> how many of the
# hardest go to stage 2. Ranking first makes every rule a prefix, so the stages are
# disjoint and cover the kept prompts by construction.
SplitRule = Callable[[np.ndarray, SplitConfig], int]
SPLIT_RULES = Registry("stage split rule")


@SPLIT_RULES.register("fraction")
def fraction_rule(ranked_pass_rates: np.ndarray, config: SplitConfig) -> int:
  if not 0.0 <= config.stage2_fraction <= 1.0:
    raise CurationError(f"split.stage2_fraction must be in [0, 1], got "
                        f"{config.stage2_fraction}")
  # Half up (not Python's round-half-even), so 0.5 of 3 prompts is 2, as one expects.
  return math.floor(config.stage2_fraction * len(ranked_pass_rates) + 0.5)


@SPLIT_RULES.register("size")
def size_rule(ranked_pass_rates: np.ndarray, config: SplitConfig) -> int:
  if config.stage2_size < 0:
    raise CurationError(f"split.stage2_size must be >= 0, got {config.stage2_size}")
  return min(config.stage2_size, len(ranked_pass_rates))


@SPLIT_RULES.register("pass_rate")
def pass_rate_rule(ranked_pass_rates: np.ndarray, config: SplitConfig) -> int:
  return int(np.searchsorted(ranked_pass_rates, config.stage2_max_pass_rate + _SLACK,
                             side="right"))


def tiebreak_key(prompt_id: str, seed: int) -> bytes:
  return hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()


def rank_by_difficulty(scores: Sequence[Score], seed: int = 0) -> list[Score]:
  """Hardest first: ascending pass rate, ties in a seeded hash order of the ids."""
  return sorted(scores, key=lambda s: (s.pass_rate, tiebreak_key(s.id, seed)))


def split_stages(kept: Sequence[Score], config: SplitConfig) -> tuple[set[str], set[str]]:
  """The ids of stage 1 and stage 2: disjoint, together exactly the ids of `kept`."""
  ranked = rank_by_difficulty(kept, config.seed)
  rates = np.array([s.pass_rate for s in ranked], np.float64)
  num_stage2 = SPLIT_RULES[config.rule](rates, config)
  return {s.id for s in ranked[num_stage2:]}, {s.id for s in ranked[:num_stage2]}


# ------------------------------------------------------------------ hints


@dataclasses.dataclass(frozen=True)
class HintConfig:
  """Which stage-2 prompts get the difficulty hint, and how.

  Attributes:
    text: the sentence (the paper's is not public; `templates.DIFFICULTY_HINT`).
    below_pass_rate: stage-2 prompts with pass rate strictly below this are flagged;
      the `difficulty_hint` template's `hint_below_pass_rate`, same comparison.
    attach_to_question: also append `text` to the record's question now, for consumers
      that do not use the `difficulty_hint` template (then do not use it as well, or
      the sentence appears twice).
  """

  text: str = templates.DIFFICULTY_HINT
  below_pass_rate: float = templates.TemplateConfig.hint_below_pass_rate
  attach_to_question: bool = False


def wants_hint(pass_rate: float, config: HintConfig) -> bool:
  # The same test as templates.difficulty_hint, so the two agree on every record.
  return pass_rate < config.below_pass_rate


def hint_template_config(base: templates.TemplateConfig,
                         config: HintConfig) -> templates.TemplateConfig:
  """The template config that trains stage 2 with the hints curation flagged.

  `base` plus the `difficulty_hint` template with this sentence and threshold; `base`
  unchanged when the hint is already in the question (`attach_to_question`).
  """
  if config.attach_to_question:
    return base
  names = base.names if "difficulty_hint" in base.names else base.names + ("difficulty_hint",)
  return dataclasses.replace(base, names=names, hint=config.text,
                             hint_below_pass_rate=config.below_pass_rate)


# ------------------------------------------------------------------ the whole curation


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  """Filter interval (pass rates, or counts that override them), split and hints."""

  low: float = DEFAULT_LOW
  high: float = DEFAULT_HIGH
  min_correct: int | None = None
  max_correct: int | None = None
  split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
  hint: HintConfig = dataclasses.field(default_factory=HintConfig)


@dataclasses.dataclass
class Curation:
  """What curation made of a scored dataset.

  Attributes:
    bounds: the kept interval as counts of correct answers.
    histogram: [K + 1] prompts per number of correct answers, over all scored prompts.
    stage1, stage2: the kept records, in dataset order, with `pass_rate` set and
      `metadata["hint"]` (bool) and `metadata["curation"]` ({num_correct, num_samples,
      stage}) added.
    dropped: reason (`DROP_REASONS`) -> ids, in dataset order.
  """

  bounds: CorrectBounds
  histogram: np.ndarray
  stage1: list[Record]
  stage2: list[Record]
  dropped: dict[str, list[str]]

  @property
  def num_prompts(self) -> int:
    return int(self.histogram.sum())

  @property
  def num_hinted(self) -> int:
    return sum(bool(r.metadata.get("hint")) for r in self.stage2)


def common_num_samples(scores: Mapping[str, Score] | Sequence[Score]) -> int:
  """The K every score shares; an error if they differ (pass rates would not compare)."""
  values = scores.values() if isinstance(scores, Mapping) else scores
  ks = sorted({s.num_samples for s in values})
  if len(ks) != 1:
    raise CurationError(f"all prompts must be scored with one num_samples, found {ks}"
                        if ks else "no scored prompts")
  return ks[0]


def _annotate(record: Record, score: Score, stage: str, hint: HintConfig) -> Record:
  hinted = stage == "stage2" and wants_hint(score.pass_rate, hint)
  metadata = dict(record.metadata, hint=hinted, curation={
      "num_correct": score.num_correct, "num_samples": score.num_samples, "stage": stage})
  question = record.question
  if hinted and hint.attach_to_question:
    question = f"{question} {hint.text}"
  return record.replace(pass_rate=score.pass_rate, metadata=metadata, question=question)


def curate(records: Sequence[Record], scores: Mapping[str, Score],
           config: CurationConfig = CurationConfig()) -> Curation:
  """Filters, splits and flags `records` by their `scores` (id -> Score).

  Every record needs a score; scores of ids not in `records` are ignored.
  """
  missing = [r.id for r in records if r.id not in scores]
  if missing:
    raise CurationError(f"{len(missing)} records have no score, e.g. {missing[:3]}")
  ids = [r.id for r in records]
  if len(set(ids)) != len(ids):
    raise CurationError("record ids must be unique to be scored and split by id")
  own = [scores[r.id] for r in records]
  if not own:
    raise CurationError("no records to curate")
  num_samples = common_num_samples(own)
  bounds = correct_bounds(num_samples, config.low, config.high, config.min_correct,
                          config.max_correct)
  dropped: dict[str, list[str]] = {reason: [] for reason in DROP_REASONS}
  kept = []
  for score in own:
    reason = bounds.drop_reason(score.num_correct)
    if reason is None:
      kept.append(score)
    else:
      dropped[reason].append(score.id)
  stage1_ids, stage2_ids = split_stages(kept, config.split)
  stages: dict[str, list[Record]] = {stage: [] for stage in STAGES}
  for record, score in zip(records, own):
    stage = "stage1" if record.id in stage1_ids else "stage2" if record.id in stage2_ids else None
    if stage is not None:
      stages[stage].append(_annotate(record, score, stage, config.hint))
  return Curation(bounds=bounds, histogram=histogram([s.num_correct for s in own], num_samples),
                  stage1=stages["stage1"], stage2=stages["stage2"], dropped=dropped)
