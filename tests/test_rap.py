"""RAP selection logic: CDE, ACE and DRM decisions on hand-computed cases, properties
that hold for any scores (hypothesis), and the scores file round trip."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, settings, strategies as st

from dprl.curation import rap
from dprl.curation.rap import SampleScore, SelectionConfig

LOG_HALF = math.log(0.5)


def score(id_, mm, text, m=4, log_psi=-math.inf):
  return SampleScore(id=id_, num_mm=m, mm_correct=mm, num_text=m, text_correct=text,
                     log_max_psi=log_psi)


def test_sample_score_derived_values():
  s = score("x", 3, 1)
  assert (s.acc_mm, s.acc_text, s.discrepancy, s.error_rate) == (0.75, 0.25, 0.5, 0.25)
  assert s.max_psi == 0.0
  assert SampleScore("y", 5, 2, 4, 3).discrepancy == pytest.approx(0.4 - 0.75)


def test_cde_is_strict_at_the_threshold_without_float_noise():
  # 9/10 - 7/10 as a float difference is 0.20000000000000007 > 0.2.
  assert not rap.passes_cde(score("x", 9, 7, m=10), 0.2)
  assert not rap.passes_cde(score("x", 2, 1, m=5), 0.2)  # D = 0.2 exactly
  assert rap.passes_cde(score("x", 3, 1, m=5), 0.2)
  assert not rap.passes_cde(score("x", 3, 3), -0.0)


def test_ace_compares_logs_and_keeps_the_boundary():
  assert rap.passes_ace(score("x", 1, 0, log_psi=-math.inf), 0.1)
  assert rap.passes_ace(score("x", 1, 0, log_psi=math.log(0.1)), 0.1)
  assert not rap.passes_ace(score("x", 1, 0, log_psi=math.log(0.2)), 0.1)
  assert rap.passes_ace(score("x", 1, 0, log_psi=-50000.0), 1e-300)  # exp() would be 0
  with pytest.raises(ValueError, match="ace lambda"):
    rap.passes_ace(score("x", 1, 0), 0.0)


def test_trivial_and_hard_follow_the_error_rate():
  assert rap.is_trivial(score("x", 4, 0)) and not rap.is_hard(score("x", 4, 0))
  assert rap.is_hard(score("x", 1, 0)) and rap.is_hard(score("x", 3, 0))
  assert not rap.is_hard(score("x", 0, 0))  # never right: error rate 1 is excluded
  assert not rap.is_hard(SampleScore("x", 1, 0, 1, 0))  # M = 1: [1, 1) is empty


def test_invalid_scores_name_the_sample_and_field():
  with pytest.raises(ValueError, match=r"sample 'x': mm_correct=5 must be in \[0, num_mm=4\]"):
    score("x", 5, 0)
  with pytest.raises(ValueError, match="cde_threshold"):
    SelectionConfig(cde_threshold=1.0)
  with pytest.raises(ValueError, match="target_size"):
    SelectionConfig(target_size=-1)
  with pytest.raises(ValueError, match=r"duplicate sample ids in scores: \['a'\]"):
    rap.select([score("a", 1, 0), score("a", 2, 0)])


# M = 4, cde_threshold 0.2, lambda 0.1:
#   a: always right, D = 1            -> survivor, trivial: replaced
#   b: 3/4, D = 0.75                  -> selected
#   c: 2/4 vs 2/4, D = 0              -> CDE; pool (error 0.5)
#   d: 1/4 vs 1/4, D = 0              -> CDE; pool, the hardest (error 0.75)
#   e: 1/4 vs 0/4, D = 0.25, psi 0.5  -> ACE
#   f: never right, D = 0             -> CDE; not hard, not in the pool
#   g: 1/4 vs 1/4, psi 0.5            -> CDE and ACE; not in the pool (fails ACE)
HAND = [score("a", 4, 0), score("b", 3, 0), score("c", 2, 2), score("d", 1, 1),
        score("e", 1, 0, log_psi=LOG_HALF), score("f", 0, 0),
        score("g", 1, 1, log_psi=LOG_HALF)]


def reasons(selection):
  return {d.score.id: d.reason for d in selection.decisions}


def test_hand_computed_selection():
  selection = rap.select(HAND)
  assert selection.selected == ["b", "d"]
  assert reasons(selection) == {"a": "drm_trivial", "b": "selected", "c": "cde",
                                "d": "drm_replacement", "e": "ace", "f": "cde", "g": "cde"}
  assert selection.report == {
      "total": 7, "removed_by_cde": 4, "removed_by_ace": 1, "ace_flagged": 2,
      "survivors": 2, "trivial_removed": 1, "replacement_pool": 2, "replaced": 1,
      "refilled": 0, "target": 2, "shortfall": 0, "selected": 2}
  assert [d.kept for d in selection.decisions] == [False, True, False, True, False, False,
                                                    False]


def test_target_size_fills_hardest_first_then_refills_with_trivial():
  assert rap.select(HAND, SelectionConfig(target_size=3)).selected == ["b", "d", "c"]
  bigger = rap.select(HAND, SelectionConfig(target_size=5))
  assert bigger.selected == ["b", "d", "c", "a"]
  assert reasons(bigger)["a"] == "drm_refill"
  assert (bigger.report["refilled"], bigger.report["shortfall"]) == (1, 1)
  no_refill = rap.select(HAND, SelectionConfig(target_size=5, refill_with_trivial=False))
  assert no_refill.selected == ["b", "d", "c"]
  assert no_refill.report["shortfall"] == 2
  # DRM never subsamples: a target below the non-trivial survivors keeps them all.
  assert rap.select(HAND, SelectionConfig(target_size=0)).selected == ["b"]


def test_estimators_can_be_switched_off():
  assert rap.select(HAND, SelectionConfig(use_drm=False)).selected == ["a", "b"]
  no_ace = rap.select(HAND, SelectionConfig(use_ace=False))
  # Survivors a, b, e; a is replaced by the hardest of the pool c, d, g (d and g tie on
  # error rate and D: by id).
  assert no_ace.selected == ["b", "e", "d"]
  assert no_ace.report["replacement_pool"] == 3
  no_cde = rap.select(HAND, SelectionConfig(use_cde=False))
  # Every ACE-passing sample survives, so the pool is empty and a is refilled.
  assert no_cde.selected == ["b", "c", "d", "f", "a"]


def test_report_table_lists_every_count():
  table = rap.report_table(rap.select(HAND).report)
  assert "removed by CDE (D <= threshold)" in table and "DRM: replacements added" in table
  assert len(table.splitlines()) == 2 + 12


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


@st.composite
def score_lists(draw):
  m = draw(st.integers(1, 6))
  n = draw(st.integers(0, 25))
  log_psi = st.one_of(st.just(-math.inf), st.floats(-200.0, 0.0))
  return [SampleScore(id=f"s{i}", num_mm=m, mm_correct=draw(st.integers(0, m)),
                      num_text=m, text_correct=draw(st.integers(0, m)),
                      log_max_psi=draw(log_psi)) for i in range(n)]


configs = st.builds(
    SelectionConfig, use_cde=st.booleans(), cde_threshold=st.sampled_from([-0.5, 0.0, 0.2, 0.5]),
    use_ace=st.booleans(), ace_lambda=st.sampled_from([1e-3, 0.1, 0.9]),
    use_drm=st.booleans(), target_size=st.one_of(st.none(), st.integers(0, 30)),
    refill_with_trivial=st.booleans())


@settings(max_examples=300, deadline=None)
@given(scores=score_lists(), config=configs)
def test_selection_invariants(scores, config):
  selection = rap.select(scores, config)
  by_id = {s.id: s for s in scores}
  decisions = {d.score.id: d for d in selection.decisions}
  selected = selection.selected
  report = selection.report
  assert len(set(selected)) == len(selected) and set(selected) <= set(by_id)
  assert {i for i, d in decisions.items() if d.kept} == set(selected)
  assert report["total"] == report["removed_by_cde"] + report["removed_by_ace"] + report[
      "survivors"]
  assert report["selected"] == len(selected)
  if config.use_ace:  # nothing selected fails ACE, replacements included
    assert all(rap.passes_ace(by_id[i], config.ace_lambda) for i in selected)
  if not config.use_drm:
    assert all(decisions[i].reason == rap.SELECTED for i in selected)
    assert report["selected"] == report["survivors"]
    return
  assert report["selected"] == (report["survivors"] - report["trivial_removed"] +
                                report["replaced"] + report["refilled"])
  trivial_kept = [i for i in selected if rap.is_trivial(by_id[i])]
  if trivial_kept:  # only once the pool is used up
    assert report["replaced"] == report["replacement_pool"]
  replaced = [i for i in selected if decisions[i].reason == rap.DRM_REPLACEMENT]
  assert all(rap.is_hard(by_id[i]) for i in replaced)
  pool_left = [d.score for d in selection.decisions
               if not d.kept and not d.trivial and rap.is_hard(d.score)
               and (d.ace_pass or not config.use_ace)
               and not (d.cde_pass and (d.ace_pass or not config.use_ace))]
  if replaced and pool_left:  # the hardest were taken
    assert min(by_id[i].error_rate for i in replaced) >= max(s.error_rate for s in pool_left)
  target = report["survivors"] if config.target_size is None else config.target_size
  non_trivial = report["survivors"] - report["trivial_removed"]
  if config.refill_with_trivial:
    assert len(selected) == max(non_trivial, min(target, non_trivial + report[
        "replacement_pool"] + report["trivial_removed"]))
  if config.target_size is None and config.refill_with_trivial:
    assert len(selected) == report["survivors"]  # DRM swaps one for one


@settings(max_examples=100, deadline=None)
@given(scores=score_lists(), low=st.floats(-1.0, 0.99), high=st.floats(-1.0, 0.99))
def test_a_higher_cde_threshold_never_keeps_more(scores, low, high):
  assume(low <= high)
  keep = lambda t: set(rap.select(scores, SelectionConfig(cde_threshold=t,
                                                          use_drm=False)).selected)
  assert keep(high) <= keep(low)


@given(m=st.integers(1, 8), t=st.integers(1, 8), data=st.data())
def test_discrepancy_is_acc_mm_minus_acc_text_in_range(m, t, data):
  s = SampleScore("x", m, data.draw(st.integers(0, m)), t, data.draw(st.integers(0, t)))
  assert -1.0 <= s.discrepancy <= 1.0
  assert s.discrepancy == pytest.approx(s.acc_mm - s.acc_text, abs=1e-12)


# ---------------------------------------------------------------------------------------
# The scores file
# ---------------------------------------------------------------------------------------


@given(log_psi=st.one_of(st.just(-math.inf), st.floats(-1e6, 10.0)),
       prior=st.sampled_from([None, True, False]), level=st.one_of(st.none(), st.integers(0, 9)))
def test_score_json_round_trip(log_psi, prior, level):
  s = SampleScore("id\u00e9", 5, 3, 5, 1, log_psi, "the", "synthetic", level, prior)
  row = json.loads(json.dumps(s.to_json()))
  assert SampleScore.from_json(row) == s
  assert row["D"] == s.discrepancy and row["acc_mm"] == 0.6


def test_scores_file_appends_and_survives_a_torn_last_line(tmp_path):
  path = tmp_path / "scores.jsonl"
  rap.append_scores(path, HAND[:3])
  rap.append_scores(path, [HAND[3], score("a", 0, 0)])  # a rescored: the last row wins
  with path.open("a") as f:
    f.write('{"id": "torn", "num_m')
  got = rap.read_scores(path)
  assert [s.id for s in got] == ["b", "c", "d", "a"]
  assert got[-1].mm_correct == 0
  path.write_text('{"id": "x"}\n')
  with pytest.raises(ValueError, match=r"score row 'x': missing fields"):
    rap.read_scores(path)
  path.write_text('not json\n{"id": "x"}\n')
  with pytest.raises(ValueError, match=r"scores.jsonl:1: not a JSON line"):
    rap.read_scores(path)
