"""Held-out evaluation during training: greedy and sampled evaluators as one hook."""

from __future__ import annotations

import pathlib

import pytest

from dprl import cli
from dprl import train as train_lib
from dprl.evaluation.periodic import EvalSuite, PeriodicEval
from dprl.models import qwen2_5_vl

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _config(**eval_overrides):
  config = cli.load_config(f"{CONFIGS}/grpo.py:tiny")
  config.eval.every = 2
  config.eval.num_items = 6
  config.eval.batch_size = 6
  for key, value in eval_overrides.items():
    setattr(config.eval, key, value)
  return config


def test_sampled_evaluation_is_logged_beside_the_greedy_one(tmp_path):
  config = _config(sampled_num_samples=3)
  tokenizer = train_lib.load_tokenizer(config.tokenizer, str(tmp_path))
  model = qwen2_5_vl.init(train_lib.preset_for_tokenizer(config, tokenizer), seed=0)
  evaluator = train_lib.held_out_evaluator(config, tokenizer)
  greedy, sampled = evaluator.evaluators
  assert (greedy.kwargs["temperature"], greedy.kwargs["num_samples"]) == (0.0, 1)
  assert (sampled.kwargs["temperature"], sampled.kwargs["num_samples"]) == (1.0, 3)
  metrics = evaluator(0, model)
  for prefix in ("eval/", "eval_sampled/"):
    assert 0.0 <= metrics[f"{prefix}accuracy"] <= 1.0
    assert any(k.startswith(f"{prefix}accuracy_level_") for k in metrics)
  # Off the schedule nothing runs; the same seed gives the same sampled draws.
  assert evaluator(1, model) == {}
  assert evaluator(2, model)["eval_sampled/accuracy"] == metrics["eval_sampled/accuracy"]


def test_sampled_evaluation_is_off_by_default(tmp_path):
  config = _config()
  tokenizer = train_lib.load_tokenizer(config.tokenizer, str(tmp_path))
  assert [e.prefix for e in train_lib.held_out_evaluator(config, tokenizer).evaluators] == ["eval/"]


def test_evaluators_sharing_a_prefix_are_refused():
  make = lambda: PeriodicEval([], None, every=1, template=None, max_new_tokens=4,
                              min_pixels=1, max_pixels=1)
  with pytest.raises(ValueError, match="share a metric prefix"):
    EvalSuite([make(), make()])
