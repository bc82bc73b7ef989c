"""Verifiable rewards for math and visual-reasoning responses.

A reward function maps one `(response, reference)` pair to `(reward, correct)`; the
registry `REWARD_FNS` lets a config pick one by name, and `score_responses` scores a batch:

    rewards, correct = score_responses(responses, references, reward_fn="math")
    # rewards: [N] float32, correct: [N] bool

The common GRPO recipe (methods.md) is `0.9 * accuracy + 0.1 * format`:
  * accuracy: the final answer (the last `\\boxed{...}`, or the last match of a configured
    answer regex such as `<answer>(.*?)</answer>`) is equivalent to the reference. Checked
    by math-verify (numbers, fractions, LaTeX, sets, units), with multiple-choice letters
    ("B" vs "\\boxed{(B)}") and a case/whitespace-normalised string comparison first.
  * format: one `<think>...</think>` block at the start, then the answer.

Model output is arbitrary text, so nothing here raises on a malformed response: a
response with no answer, unbalanced braces or unparsable LaTeX simply scores 0 accuracy.

Threads. math-verify bounds parse and verify time with `signal.alarm`, which only works in
the main thread (elsewhere it raises). Here the timeout is used in the main thread and
switched off in any other thread (`parsing_timeout=None`, `timeout_seconds=None`), so a
scorer running in a background thread works; there, runaway sympy work is bounded instead
by refusing to hand math-verify answers longer than `MAX_ANSWER_CHARS` (those fall back to
the string comparison).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Sequence

import numpy as np
from math_verify import parse, verify

from dprl.rl.registry import Registry

# Longer answers are compared as strings only: without a timeout (worker threads) sympy can
# spend minutes on a pathological expression, and a real final answer is never this long.
MAX_ANSWER_CHARS = 1000
# Seconds math-verify may spend on one parse or comparison, where signals allow a timeout.
MATH_VERIFY_TIMEOUT_S = 5

# A reward function: (response, reference, **params) -> (reward, correct).
RewardFn = Callable[..., tuple[float, bool]]

REWARD_FNS = Registry("reward function")
register_reward = REWARD_FNS.register

_BOXED_COMMANDS = (r"\boxed", r"\fbox")


# ---------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------


def _braced_content(text: str, open_brace: int) -> str | None:
  """The text inside the brace group opening at `text[open_brace]`, or None if unclosed.

  Escaped braces (`\\{`, `\\}`) are content, not grouping, as in `\\boxed{\\{1, 2\\}}`.
  """
  depth = 0
  i = open_brace
  while i < len(text):
    char = text[i]
    if char == "\\":
      i += 2
      continue
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return text[open_brace + 1:i]
    i += 1
  return None


def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced.

  Returns None when there is none, or when the last one is never closed: a response cut
  off inside its final answer has not given one, so an earlier boxed draft does not count.
  """
  start = max(text.rfind(command) for command in _BOXED_COMMANDS)
  if start < 0:
    return None
  command = next(c for c in _BOXED_COMMANDS if text.startswith(c, start))
  i = start + len(command)
  while i < len(text) and text[i].isspace():
    i += 1
  if i >= len(text) or text[i] != "{":
    return None
  return _braced_content(text, i)


def _compile(answer_pattern: str | re.Pattern | None) -> re.Pattern | None:
  if answer_pattern is None or isinstance(answer_pattern, re.Pattern):
    return answer_pattern
  if not isinstance(answer_pattern, str):
    raise TypeError(f"answer_pattern must be a regex string, a compiled pattern or None, "
                    f"got {type(answer_pattern).__name__}")
  return _compile_str(answer_pattern)


@functools.lru_cache(maxsize=64)
def _compile_str(answer_pattern: str) -> re.Pattern:
  try:
    # DOTALL: answers (and the reasoning around them) span lines.
    return re.compile(answer_pattern, re.DOTALL)
  except re.error as e:
    raise ValueError(f"answer_pattern {answer_pattern!r} is not a valid regex: {e}") from e


def extract_answer(response: str,
                   answer_pattern: str | re.Pattern | None = None) -> str | None:
  """The final answer in `response`, or None if it gives none.

  Args:
    response: a model response.
    answer_pattern: None for the last `\\boxed{...}`; otherwise a regex whose last match
      is the answer (its first group if it has groups, else the whole match), e.g.
      `<answer>(.*?)</answer>`. A boxed expression inside the match is unwrapped.
  """
  pattern = _compile(answer_pattern)
  if pattern is None:
    return last_boxed(response)
  matches = list(pattern.finditer(response))
  if not matches:
    return None
  last = matches[-1]
  answer = last.group(1) if pattern.groups else last.group(0)
  if answer is None:
    return None
  boxed = last_boxed(answer)
  return boxed if boxed is not None else answer


# ---------------------------------------------------------------------------------------
# Answer comparison
# ---------------------------------------------------------------------------------------

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_WHITESPACE = re.compile(r"\s+")
# A multiple-choice reference: one capital letter, optionally "(B)", "B." or "B)".
_CHOICE_REFERENCE = re.compile(r"\(?([A-Z])\)?\.?")
# A response's choice: a letter standing alone at the start ("B", "(b)", "B. 30", "B: x").
_CHOICE_ANSWER = re.compile(r"\(?\s*([A-Za-z])\s*\)?(?:[.:)]|\s|$)")


def _strip_markup(text: str) -> str:
  """`text` without `$`, `\\text{}`-style wrappers, a final '.' or surplus whitespace."""
  text = _TEXT_WRAPPER.sub(r"\1", text)
  text = text.replace("$", "")
  return _WHITESPACE.sub(" ", text).strip().rstrip(".").strip()


def normalize_text(text: str) -> str:
  """The plain-string form answers are compared in: markup stripped, case-folded."""
  return _strip_markup(text).casefold()


def _reference_choice(reference: str) -> str | None:
  """The option letter if `reference` is a multiple-choice answer, else None."""
  match = _CHOICE_REFERENCE.fullmatch(_strip_markup(reference))
  return match.group(1) if match else None


def _answer_choice(answer: str) -> str | None:
  """The option letter an answer opens with, upper-cased, or None."""
  match = _CHOICE_ANSWER.match(_strip_markup(answer))
  return match.group(1).upper() if match else None


def _math_verify_timeout() -> int | None:
  # signal.alarm only works in the main thread; elsewhere run without a timeout (see the
  # module docstring for how runaway work is bounded there instead).
  if threading.current_thread() is threading.main_thread():
    return MATH_VERIFY_TIMEOUT_S
  return None


def _parse(expression: str) -> list:
  # `$...$` makes math-verify read the whole string as one LaTeX expression.
  return parse(f"${expression}$", parsing_timeout=_math_verify_timeout())


@functools.lru_cache(maxsize=1 << 16)
def _parse_reference(reference: str) -> tuple:
  # References repeat G times per prompt and across epochs; parsing is the slow part.
  return tuple(_parse(reference))


def answers_match(answer: str, reference: str) -> bool:
  """Whether an extracted answer is equivalent to the reference. Never raises."""
  try:
    answer_text = normalize_text(answer)
    reference_text = normalize_text(reference)
    if not answer_text:
      return False
    if answer_text == reference_text:
      return True
    reference_letter = _reference_choice(reference)
    if reference_letter is not None:
      # A letter is an option label, not a variable: math-verify would read "E" as Euler's
      # number and "(B)" as an interval.
      return _answer_choice(answer) == reference_letter
    if len(answer) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
      return False
    gold = _parse_reference(reference.strip().strip("$"))
    predicted = _parse(answer.strip().strip("$"))
    if not gold or not predicted:
      return False
    return bool(verify(list(gold), predicted, timeout_seconds=_math_verify_timeout()))
  except Exception:  # pylint: disable=broad-except
    # A reward must never take a training run down over one odd response (sympy raises
    # a zoo of exception types on malformed input).
    return False


# ---------------------------------------------------------------------------------------
# Reward components
# ---------------------------------------------------------------------------------------

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def accuracy_reward(response: str, reference: str,
                    answer_pattern: str | re.Pattern | None = None) -> float:
  """1.0 if the response's final answer is equivalent to `reference`, else 0.0."""
  answer = extract_answer(response, answer_pattern)
  if answer is None:
    return 0.0
  return float(answers_match(answer, reference))


def format_reward(response: str, answer_pattern: str | re.Pattern | None = None) -> float:
  """1.0 for one `<think>...</think>` block at the start followed by an answer, else 0.0.

  The answer is what `extract_answer(..., answer_pattern)` finds after `</think>`: a
  `\\boxed{...}` by default, or e.g. `<answer>...</answer>` with that pattern.
  """
  text = response.strip()
  if not text.startswith(_THINK_OPEN):
    return 0.0
  if text.count(_THINK_OPEN) != 1 or text.count(_THINK_CLOSE) != 1:
    return 0.0
  after_think = text.split(_THINK_CLOSE, 1)[1]
  return float(extract_answer(after_think, answer_pattern) is not None)


@register_reward("math")
def math_reward(response: str, reference: str, *,
                accuracy_weight: float = 0.9,
                format_weight: float = 0.1,
                answer_pattern: str | re.Pattern | None = None) -> tuple[float, bool]:
  """`accuracy_weight * accuracy + format_weight * format`; `correct` is accuracy == 1."""
  accuracy = accuracy_reward(response, reference, answer_pattern)
  reward = accuracy_weight * accuracy
  if format_weight:
    reward += format_weight * format_reward(response, answer_pattern)
  return reward, accuracy == 1.0


@register_reward("math_answer_tag")
def math_answer_tag_reward(response: str, reference: str, *,
                           accuracy_weight: float = 0.9,
                           format_weight: float = 0.1,
                           answer_pattern: str | re.Pattern | None = r"<answer>(.*?)</answer>"
                           ) -> tuple[float, bool]:
  """`math` with the answer in `<answer>...</answer>` (R1-V style prompts)."""
  return math_reward(response, reference, accuracy_weight=accuracy_weight,
                     format_weight=format_weight, answer_pattern=answer_pattern)


@register_reward("accuracy")
def accuracy_only_reward(response: str, reference: str, *,
                         answer_pattern: str | re.Pattern | None = None
                         ) -> tuple[float, bool]:
  """Accuracy alone (evaluation, or training without a format term)."""
  accuracy = accuracy_reward(response, reference, answer_pattern)
  return accuracy, accuracy == 1.0


# ---------------------------------------------------------------------------------------
# Batch scoring
# ---------------------------------------------------------------------------------------


def score_responses(responses: Sequence[str], references: Sequence[str],
                    reward_fn: str | RewardFn = "math",
                    **params) -> tuple[np.ndarray, np.ndarray]:
  """Scores a batch of responses against their references.

  Args:
    responses: N model responses (for GRPO, the P x G group members flattened row-major).
    references: N reference answers, one per response.
    reward_fn: a name in `REWARD_FNS` or a reward function.
    **params: passed to the reward function (e.g. `accuracy_weight`, `format_weight`,
      `answer_pattern`).

  Returns:
    rewards: [N] float32.
    correct: [N] bool, whether each final answer matched its reference.
  """
  if isinstance(responses, str) or isinstance(references, str):
    raise TypeError("responses and references must be sequences of strings, not one string")
  if len(responses) != len(references):
    raise ValueError(f"got {len(responses)} responses but {len(references)} references; "
                     "need one reference per response")
  fn = REWARD_FNS[reward_fn] if isinstance(reward_fn, str) else reward_fn
  rewards = np.zeros(len(responses), np.float32)
  correct = np.zeros(len(responses), np.bool_)
  for i, (response, reference) in enumerate(zip(responses, references)):
    if not isinstance(response, str):
      raise TypeError(f"responses[{i}] is a {type(response).__name__}, not a str")
    if not isinstance(reference, str):
      raise TypeError(f"references[{i}] is a {type(reference).__name__}, not a str")
    rewards[i], correct[i] = fn(response, reference, **params)
  return rewards, correct
