"""Tests for dprl.rl.rewards: answer extraction, equivalence, format and batch scoring."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dprl.rl import rewards
from dprl.rl.registry import UnknownNameError
from dprl.rl.rewards import (REWARD_FNS, accuracy_reward, answers_match, extract_answer,
                             format_reward, last_boxed, math_reward, register_reward,
                             score_responses)


def _response(answer: str, think: str = "some reasoning") -> str:
  return f"<think>{think}</think> The answer is \\boxed{{{answer}}}."


# --- extraction ------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (r"\boxed{3}", "3"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{ {a}{b} }", " {a}{b} "),
    (r"\boxed {7}", "7"),
    (r"\fbox{8}", "8"),
    ("no answer here", None),
    (r"\boxed{1} and a truncated \boxed{\frac{1}{", None),
    (r"\boxed", None),
    (r"\boxed 5", None),
])
def test_last_boxed_handles_nested_braces(text, expected):
  assert last_boxed(text) == expected


def test_extract_answer_with_pattern_takes_last_match_and_unwraps_boxed():
  pattern = r"<answer>(.*?)</answer>"
  assert extract_answer("<answer>1</answer> <answer> 2 </answer>", pattern) == " 2 "
  assert extract_answer(r"<answer>\boxed{5}</answer>", pattern) == "5"
  assert extract_answer("<answer>\n3\n</answer>", pattern) == "\n3\n"  # DOTALL
  assert extract_answer(r"\boxed{5}", pattern) is None


def test_extract_answer_rejects_bad_pattern_with_clear_error():
  with pytest.raises(ValueError, match="not a valid regex"):
    extract_answer("x", "<answer>(.*</answer>")
  with pytest.raises(TypeError, match="answer_pattern"):
    extract_answer("x", 3)


# --- equivalence -----------------------------------------------------------------------


@pytest.mark.parametrize("answer, reference", [
    ("3", "3"),
    ("3.0", "3"),
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac{1}{2}", "1/2"),
    (r"\sqrt{12}", r"2\sqrt{3}"),
    (r"30^\circ", "30"),
    (r"5\text{ cm}", "5"),
    ("x=3", "3"),
    (r"\{2, 1\}", r"\{1,2\}"),
    ("B", "B"),
    ("(B)", "B"),
    (r"\text{B}", "B"),
    ("b", "B"),
    ("B. 30 degrees", "B"),
    ("B", "(B)"),
    ("  Yes ", "yes"),
    ("North   West", "north west"),
])
def test_answers_match_equivalent(answer, reference):
  assert answers_match(answer, reference)


@pytest.mark.parametrize("answer, reference", [
    ("4", "3"),
    ("0.333", r"\frac{1}{3}"),
    ("C", "B"),
    ("Bob", "B"),
    ("E", "B"),
    ("", "3"),
    ("   ", "3"),
    ("no", "yes"),
])
def test_answers_match_different(answer, reference):
  assert not answers_match(answer, reference)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.sampled_from(["3", r"\frac{1}{2}", "B", "yes", ""]))
def test_accuracy_never_raises_on_arbitrary_output(text, reference):
  response = _response(text)
  assert accuracy_reward(response, reference) in (0.0, 1.0)
  assert accuracy_reward(text, reference) in (0.0, 1.0)


@pytest.mark.parametrize("response", [
    r"\boxed{\frac{1}{}}", r"\boxed{}}}", r"\boxed{\left(}", r"\boxed{^^^}", "}{" * 50,
    r"\boxed{" + "(" * 200 + "}", r"\boxed{" + "1" * 5000 + "}",
])
def test_accuracy_of_malformed_output_is_zero(response):
  assert accuracy_reward(response, "3") == 0.0


def test_overlong_answer_is_compared_as_string_only():
  long = "1+" * rewards.MAX_ANSWER_CHARS + "1"
  assert not answers_match(long, str(rewards.MAX_ANSWER_CHARS + 1))
  assert answers_match(long, long)


def test_accuracy_works_in_worker_thread():
  # math-verify's default signal-based timeout raises outside the main thread.
  results = {}

  def work():
    results["scores"] = score_responses(
        [_response(r"\frac{2}{4}"), _response("7"), _response("(C)")],
        ["0.5", "8", "C"])

  thread = threading.Thread(target=work)
  thread.start()
  thread.join(timeout=60)
  assert not thread.is_alive()
  rewards_, correct = results["scores"]
  np.testing.assert_array_equal(correct, [True, False, True])
  np.testing.assert_allclose(rewards_, [1.0, 0.1, 1.0], rtol=1e-6)


# --- format ----------------------------------------------------------------------------


@pytest.mark.parametrize("response, expected", [
    (_response("3"), 1.0),
    ("  <think>\nx\n</think>\n\\boxed{3}  ", 1.0),
    (r"<think></think>\boxed{3}", 1.0),
    (r"\boxed{3}", 0.0),                                   # no reasoning block
    (r"<think>x</think> the answer is 3", 0.0),            # no boxed answer
    (r"<think>x \boxed{3}</think>", 0.0),                  # answer only inside think
    (r"preamble <think>x</think>\boxed{3}", 0.0),          # think not at the start
    (r"<think>x</think><think>y</think>\boxed{3}", 0.0),   # two reasoning blocks
    (r"<think>x\boxed{3}", 0.0),                           # unterminated think
])
def test_format_reward(response, expected):
  assert format_reward(response) == expected


def test_format_reward_with_answer_tag_pattern():
  pattern = r"<answer>(.*?)</answer>"
  assert format_reward("<think>x</think><answer>3</answer>", pattern) == 1.0
  assert format_reward(r"<think>x</think>\boxed{3}", pattern) == 0.0


# --- combined reward, registry and batch -----------------------------------------------


def test_math_reward_weights_accuracy_and_format():
  assert math_reward(_response("3"), "3") == pytest.approx((1.0, True))
  assert math_reward(_response("4"), "3") == pytest.approx((0.1, False))
  assert math_reward(r"\boxed{3}", "3") == pytest.approx((0.9, True))
  assert math_reward(_response("3"), "3", accuracy_weight=0.5,
                     format_weight=0.5) == pytest.approx((1.0, True))


def test_score_responses_batch():
  responses = [_response("3"), _response("4"), r"\boxed{3}", "gibberish", _response("B")]
  references = ["3", "3", "3", "3", "(B)"]
  rewards_, correct = score_responses(responses, references)
  assert rewards_.dtype == np.float32 and rewards_.shape == (5,)
  assert correct.dtype == np.bool_ and correct.shape == (5,)
  np.testing.assert_allclose(rewards_, [1.0, 0.1, 0.9, 0.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(correct, [True, False, True, False, True])


def test_score_responses_answer_tag_variant_and_weights():
  responses = ["<think>x</think><answer>\\frac{1}{2}</answer>", r"<think>x</think>\boxed{0.5}"]
  rewards_, correct = score_responses(responses, ["0.5", "0.5"], reward_fn="math_answer_tag")
  np.testing.assert_allclose(rewards_, [1.0, 0.0])
  np.testing.assert_array_equal(correct, [True, False])
  rewards_, _ = score_responses(responses, ["0.5", "0.5"], format_weight=0.0)
  np.testing.assert_allclose(rewards_, [0.0, 0.9])


def test_score_responses_empty_batch():
  rewards_, correct = score_responses([], [])
  assert rewards_.shape == (0,) and correct.shape == (0,)


def test_score_responses_errors_are_clear():
  with pytest.raises(ValueError, match="2 responses but 1 references"):
    score_responses(["a", "b"], ["a"])
  with pytest.raises(TypeError, match=r"responses\[1\] is a NoneType"):
    score_responses(["a", None], ["a", "b"])
  with pytest.raises(TypeError, match="not one string"):
    score_responses("abc", "abc")
  with pytest.raises(ValueError, match=r"unknown reward function 'nope'.*'math'"):
    score_responses(["a"], ["a"], reward_fn="nope")


def test_reward_registry():
  assert {"math", "math_answer_tag", "accuracy"} <= set(REWARD_FNS)
  with pytest.raises(UnknownNameError):
    REWARD_FNS["nope"]
  with pytest.raises(ValueError, match="already registered"):
    register_reward("math")(lambda response, reference: (0.0, False))

  name = "test_length_reward"
  try:
    @register_reward(name)
    def length_reward(response, reference):
      return float(len(response) == len(reference)), response == reference

    rewards_, correct = score_responses(["ab", "abc"], ["ab", "xy"], reward_fn=name)
    np.testing.assert_allclose(rewards_, [1.0, 0.0])
    np.testing.assert_array_equal(correct, [True, False])
  finally:
    REWARD_FNS.pop(name, None)
