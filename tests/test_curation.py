"""Offline difficulty curation's pure logic: intervals, filtering, stage split, hints, report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dprl.curation import difficulty, report
from dprl.curation.difficulty import (CorrectBounds, CurationConfig, CurationError, HintConfig,
                                      Score, SplitConfig)
from dprl.data import templates
from dprl.data.records import Record


def _records_and_scores(num_correct, num_samples, source="s"):
  records = [Record(id=f"q{i}", question=f"question {i}", answer="1", source=source,
                    metadata={"task": "t"}) for i in range(len(num_correct))]
  scores = {r.id: Score(r.id, c, num_samples) for r, c in zip(records, num_correct)}
  return records, scores


# ------------------------------------------------------------------ intervals


@pytest.mark.parametrize("k, expected", [
    (8, (1, 6)),     # 0.8 -> 1; 6.96 -> 6 (7/8 = 0.875 > 0.87)
    (16, (2, 13)),   # 1.6 -> 2; 13.92 -> 13
    (4, (1, 3)),     # 0.4 -> 1; 3.48 -> 3
    (2, (1, 1)),
    (10, (1, 8)),    # 0.1 * 10 is 1.0000000000000002: the slack keeps it at 1
    (100, (10, 87)),
])
def test_default_interval_in_correct_answers_by_hand(k, expected):
  bounds = difficulty.correct_bounds(k)
  assert (bounds.min_correct, bounds.max_correct) == expected


def test_interval_endpoints_on_the_grid_are_kept():
  bounds = difficulty.correct_bounds(8, low=0.125, high=0.875)
  assert (bounds.min_correct, bounds.max_correct) == (1, 7)
  assert bounds.low == 0.125 and bounds.high == 0.875


def test_interval_is_clipped_so_both_ends_are_dropped():
  bounds = difficulty.correct_bounds(8, low=0.0, high=1.0)
  assert (bounds.min_correct, bounds.max_correct) == (1, 7)


def test_explicit_counts_override_the_pass_rates():
  bounds = difficulty.correct_bounds(8, min_correct=2, max_correct=5)
  assert (bounds.min_correct, bounds.max_correct) == (2, 5)
  with pytest.raises(CurationError, match="max_correct"):
    difficulty.correct_bounds(8, min_correct=1, max_correct=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=1), "num_samples must be >= 2"),
    (dict(num_samples=8, low=0.5, high=0.4), "low <= high"),
    (dict(num_samples=4, low=0.3, high=0.45), "keeps no prompts at num_samples=4"),
])
def test_bad_intervals_name_the_setting(kwargs, match):
  with pytest.raises(CurationError, match=match):
    difficulty.correct_bounds(**kwargs)


@settings(max_examples=200, deadline=None)
@given(k=st.integers(2, 64), low=st.floats(0, 1), high=st.floats(0, 1))
def test_interval_is_exactly_the_counts_whose_pass_rate_is_inside(k, low, high):
  low, high = min(low, high), max(low, high)
  # c/K in [low, high], with the documented 1e-9 slack on low*K and high*K.
  inside = [c for c in range(1, k) if low * k - 1e-9 <= c <= high * k + 1e-9]
  if not inside:
    with pytest.raises(CurationError):
      difficulty.correct_bounds(k, low, high)
    return
  bounds = difficulty.correct_bounds(k, low, high)
  assert [c for c in range(k + 1) if bounds.keeps(c)] == inside


@settings(max_examples=100, deadline=None)
@given(k=st.integers(2, 32), factor=st.integers(2, 4))
def test_interval_scales_with_k(k, factor):
  # More samples resolve the same [low, high] at least as finely: the kept pass-rate range
  # at factor * K contains the one at K (both bounds are the grid points inside it).
  small = difficulty.correct_bounds(k, 0.1, 0.87)
  large = difficulty.correct_bounds(k * factor, 0.1, 0.87)
  assert large.low <= small.low and large.high >= small.high
  assert 0.1 - 1e-9 <= large.low and large.high <= 0.87 + 1e-9


# ------------------------------------------------------------------ histogram, filtering


def test_histogram_counts_prompts_per_number_correct():
  np.testing.assert_array_equal(difficulty.histogram([0, 0, 4, 1, 4, 4], 4), [2, 1, 0, 0, 3])
  with pytest.raises(CurationError, match=r"num_correct must be in \[0, 4\]"):
    difficulty.histogram([5], 4)


def test_curate_drops_by_reason_by_hand():
  # K = 8, interval 1..6: 0 never right, 7 above, 8 always right.
  records, scores = _records_and_scores([0, 1, 3, 6, 7, 8, 2, 0], 8)
  curation = difficulty.curate(records, scores, CurationConfig(
      split=SplitConfig(rule="size", stage2_size=2)))
  assert curation.dropped == {"never_right": ["q0", "q7"], "below_interval": [],
                              "above_interval": ["q4"], "always_right": ["q5"]}
  # Kept q1 (1/8), q2 (3/8), q3 (6/8), q6 (2/8); the two hardest go to stage 2.
  assert [r.id for r in curation.stage2] == ["q1", "q6"]
  assert [r.id for r in curation.stage1] == ["q2", "q3"]
  assert [r.pass_rate for r in curation.stage2] == [1 / 8, 2 / 8]
  np.testing.assert_array_equal(curation.histogram, [2, 1, 1, 1, 0, 0, 1, 1, 1])


def test_curate_below_interval_with_a_raised_floor():
  records, scores = _records_and_scores([1, 2, 3], 8)
  curation = difficulty.curate(records, scores, CurationConfig(min_correct=2))
  assert curation.dropped["below_interval"] == ["q0"]


def test_curate_needs_a_score_for_every_record_and_one_k():
  records, scores = _records_and_scores([1, 2], 8)
  with pytest.raises(CurationError, match="have no score"):
    difficulty.curate(records, {"q0": scores["q0"]})
  scores["q1"] = Score("q1", 1, 4)
  with pytest.raises(CurationError, match=r"one num_samples, found \[4, 8\]"):
    difficulty.curate(records, scores)


def test_score_rejects_impossible_counts():
  with pytest.raises(CurationError, match="num_correct must be in"):
    Score("x", 9, 8)


# ------------------------------------------------------------------ split rules


@pytest.mark.parametrize("split, stage2", [
    (SplitConfig(rule="fraction", stage2_fraction=0.5), {"q0", "q1"}),
    (SplitConfig(rule="fraction", stage2_fraction=0.0), set()),
    (SplitConfig(rule="fraction", stage2_fraction=0.375), {"q0", "q1"}),  # 1.5 -> 2
    (SplitConfig(rule="size", stage2_size=1), {"q0"}),
    (SplitConfig(rule="size", stage2_size=99), {"q0", "q1", "q2", "q3"}),
    (SplitConfig(rule="pass_rate", stage2_max_pass_rate=0.25), {"q0", "q1"}),  # <= 2/8
])
def test_split_rules_by_hand(split, stage2):
  kept = [Score("q0", 1, 8), Score("q1", 2, 8), Score("q2", 4, 8), Score("q3", 6, 8)]
  stage1_ids, stage2_ids = difficulty.split_stages(kept, split)
  assert stage2_ids == stage2 and stage1_ids == {"q0", "q1", "q2", "q3"} - stage2


def test_unknown_split_rule_lists_the_registered_ones():
  with pytest.raises(ValueError, match=r"unknown stage split rule 'quantile2'.*fraction"):
    difficulty.split_stages([Score("a", 1, 4)], SplitConfig(rule="quantile2"))


_counts = st.lists(st.integers(0, 8), min_size=1, max_size=60)
_splits = st.one_of(
    st.builds(SplitConfig, rule=st.just("fraction"), stage2_fraction=st.floats(0, 1),
              seed=st.integers(0, 3)),
    st.builds(SplitConfig, rule=st.just("size"), stage2_size=st.integers(0, 80)),
    st.builds(SplitConfig, rule=st.just("pass_rate"),
              stage2_max_pass_rate=st.floats(0, 1)))


@settings(max_examples=150, deadline=None)
@given(counts=_counts, split=_splits, low=st.floats(0, 0.5), high=st.floats(0.5, 1))
def test_filtering_never_keeps_the_ends_and_stages_partition_the_kept(counts, split, low,
                                                                      high):
  records, scores = _records_and_scores(counts, 8)
  config = CurationConfig(low=low, high=high, split=split)
  try:
    curation = difficulty.curate(records, scores, config)
  except CurationError:
    return  # an interval with no grid point inside is refused, not curated
  stage1 = [r.id for r in curation.stage1]
  stage2 = [r.id for r in curation.stage2]
  kept = [r.id for r in records if curation.bounds.keeps(scores[r.id].num_correct)]
  assert not set(stage1) & set(stage2)
  assert sorted(stage1 + stage2) == sorted(kept)
  dropped = [i for ids in curation.dropped.values() for i in ids]
  assert sorted(dropped + kept) == sorted(r.id for r in records)
  for record in curation.stage1 + curation.stage2:
    assert 0 < record.pass_rate < 1  # never always-right nor never-right
  # Stage 2 is the hard end: none of its prompts is easier than any stage-1 prompt.
  if stage1 and stage2:
    assert max(r.pass_rate for r in curation.stage2) <= min(r.pass_rate for r in curation.stage1)


@settings(max_examples=50, deadline=None)
@given(counts=_counts, seed=st.integers(0, 5), perm_seed=st.integers(0, 1000))
def test_split_does_not_depend_on_the_order_of_the_data(counts, seed, perm_seed):
  records, scores = _records_and_scores(counts, 8)
  config = CurationConfig(split=SplitConfig(rule="fraction", stage2_fraction=0.3, seed=seed))
  shuffled = [records[i] for i in np.random.default_rng(perm_seed).permutation(len(records))]
  try:
    a = difficulty.curate(records, scores, config)
  except CurationError:
    return
  b = difficulty.curate(shuffled, scores, config)
  assert {r.id for r in a.stage2} == {r.id for r in b.stage2}


# ------------------------------------------------------------------ hints


def test_hints_flag_only_hard_stage2_prompts_and_agree_with_the_template():
  records, scores = _records_and_scores([1, 2, 3, 4, 5, 6, 1, 2], 8)
  hint = HintConfig(text="Hard one; check it.", below_pass_rate=0.3)  # < 0.3: 1/8, 2/8
  curation = difficulty.curate(records, scores, CurationConfig(
      split=SplitConfig(rule="size", stage2_size=5), hint=hint))
  assert all(r.metadata["hint"] is False for r in curation.stage1)
  hinted = {r.id for r in curation.stage2 if r.metadata["hint"]}
  assert hinted == {"q0", "q1", "q6", "q7"}
  assert curation.num_hinted == 4
  assert curation.stage2[0].metadata["curation"] == {"num_correct": 1, "num_samples": 8,
                                                     "stage": "stage2"}
  assert curation.stage2[0].metadata["task"] == "t"  # the record's own metadata is kept
  assert records[0].metadata == {"task": "t"}  # and the input is not mutated
  # Training stage 2 with this template config appends the sentence to exactly the
  # flagged records.
  template = difficulty.hint_template_config(templates.TemplateConfig(names="format"), hint)
  assert template.names == ("format", "difficulty_hint")
  for record in curation.stage2:
    prompt = templates.build_prompt(record, template)
    assert (hint.text in prompt.after_question) == record.metadata["hint"]


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(1, 15), min_size=1, max_size=30),
       threshold=st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.75, 1.0, 1 / 3]))
def test_hint_flags_match_the_template_for_any_threshold(counts, threshold):
  records, scores = _records_and_scores(counts, 16)
  hint = HintConfig(below_pass_rate=threshold)
  curation = difficulty.curate(records, scores, CurationConfig(
      min_correct=1, max_correct=15, split=SplitConfig(rule="fraction", stage2_fraction=1.0),
      hint=hint))
  template = difficulty.hint_template_config(templates.TemplateConfig(), hint)
  for record in curation.stage2:
    prompt = templates.build_prompt(record, template)
    assert (hint.text in prompt.after_question) == record.metadata["hint"]


def test_hint_can_be_written_into_the_question():
  records, scores = _records_and_scores([1, 5], 8)
  hint = HintConfig(text="Careful.", below_pass_rate=0.3, attach_to_question=True)
  curation = difficulty.curate(records, scores, CurationConfig(
      split=SplitConfig(rule="fraction", stage2_fraction=1.0), hint=hint))
  by_id = {r.id: r for r in curation.stage2}
  assert by_id["q0"].question == "question 0 Careful."
  assert by_id["q1"].question == "question 1"
  base = templates.TemplateConfig()
  assert difficulty.hint_template_config(base, hint) == base  # no second copy


def test_hint_defaults_agree_with_the_template_defaults():
  assert HintConfig().below_pass_rate == templates.TemplateConfig().hint_below_pass_rate
  assert HintConfig().text == templates.DIFFICULTY_HINT


# ------------------------------------------------------------------ report


def test_report_counts_and_histogram_json_by_hand(tmp_path):
  records, scores = _records_and_scores([0, 1, 3, 6, 7, 8, 2, 0], 8)
  curation = difficulty.curate(records, scores, CurationConfig(
      split=SplitConfig(rule="size", stage2_size=2)))
  hist = report.histogram_json(curation)
  assert hist["num_samples"] == 8 and hist["num_prompts"] == 8
  assert [b["count"] for b in hist["bins"]] == [2, 1, 1, 1, 0, 0, 1, 1, 1]
  assert [b["kept"] for b in hist["bins"]] == [False] + [True] * 6 + [False] * 2
  assert [b["stage2"] for b in hist["bins"]] == [0, 1, 1, 0, 0, 0, 0, 0, 0]
  assert [b["stage1"] for b in hist["bins"]] == [0, 0, 0, 1, 0, 0, 1, 0, 0]
  counts = report.counts_report(curation)
  assert counts["dropped"] == {"never_right": 2, "below_interval": 0, "above_interval": 1,
                               "always_right": 1}
  assert (counts["kept"], counts["stage1"], counts["stage2"], counts["stage2_hinted"]) == (
      4, 2, 2, 2)
  assert counts["by_source"] == {"s": {"stage1": 2, "stage2": 2, "hinted": 2}}
  table = report.format_counts(counts)
  assert "dropped: never_right" in table and "1..6 of 8 correct" in table
  png = report.plot_histogram(hist, tmp_path / "h.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  path = report.write_json(hist, tmp_path / "h.json")
  assert json.loads(path.read_text()) == hist
  assert math.isclose(sum(b["count"] for b in hist["bins"]), 8)
