"""Evaluation metrics against hand-computed values and brute-force pass@k; the eval config
and entry point (in-process and as `python -m dprl.eval`)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import pathlib
import subprocess
import sys

import pytest

from dprl import eval as eval_lib
from dprl.data import tokenizer as tok_lib
from dprl.data.records import Record
from dprl.evaluation import metrics
from dprl.evaluation.rollout import ItemResult, load_results

REPO = pathlib.Path(__file__).resolve().parents[1]


def _item(id_, correct, level=1, source="s", lengths=None, rewards=None):
  return ItemResult(id=id_, source=source, level=level, answer="1",
                    responses=["x"] * len(correct), correct=list(correct),
                    rewards=rewards or [float(c) for c in correct],
                    response_lengths=lengths or [10] * len(correct))


def _brute_force_pass_at_k(n, c, k):
  """The fraction of k-subsets of n responses (c correct) holding a correct one."""
  responses = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(responses[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_enumeration():
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert metrics.pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k),
                                                           abs=1e-12), (n, c, k)


def test_pass_at_1_is_the_pass_rate_and_bad_arguments_are_errors():
  assert metrics.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
  with pytest.raises(ValueError, match="pass@5 needs 1 <= k <= n responses, got n=4"):
    metrics.pass_at_k(4, 1, 5)
  with pytest.raises(ValueError, match="0 <= c <= n"):
    metrics.pass_at_k(4, 5, 1)


def test_summarize_matches_hand_computed_values():
  results = [
      _item("a", [1, 1, 0, 0], level=1, source="p", lengths=[4, 6, 8, 10]),
      _item("b", [0, 0, 0, 0], level=1, source="q"),
      _item("c", [1, 1, 1, 1], level=2, source="q", rewards=[0.5] * 4),
  ]
  summary = metrics.summarize(results, ks=(1, 2, 8))
  assert summary["ks"] == [1, 2]  # 8 > 4 responses: dropped
  assert summary["num_items"] == 3 and summary["num_samples"] == 4
  assert summary["accuracy"] == pytest.approx((0.5 + 0 + 1) / 3)
  # Sample std of [0.5, 0, 1] is 0.5; over sqrt(3) items.
  assert summary["accuracy_stderr"] == pytest.approx(0.5 / 3 ** 0.5)
  # pass@2 of "a": 1 - C(2,2)/C(4,2) = 5/6.
  assert summary["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
  assert summary["mean_reward"] == pytest.approx((2 + 0 + 2) / 12)
  assert summary["mean_response_length"] == pytest.approx((28 + 40 + 40) / 12)
  assert list(summary["by_level"]) == ["1", "2"]
  assert summary["by_level"]["1"]["accuracy"] == pytest.approx(0.25)
  assert summary["by_level"]["1"]["pass@2"] == pytest.approx(5 / 12)
  assert summary["by_level"]["2"]["accuracy_stderr"] is None  # one item
  assert summary["by_source"]["q"]["num_items"] == 2
  assert summary["by_source"]["q"]["accuracy"] == pytest.approx(0.5)
  json.dumps(summary)  # the report is JSON


def test_summarize_orders_levels_numerically_with_none_last():
  results = [_item("a", [1], level=None), _item("b", [0], level=10), _item("c", [1], level=2)]
  assert list(metrics.summarize(results)["by_level"]) == ["2", "10", "none"]


def test_format_table_has_a_row_per_group_and_a_column_per_k():
  results = [_item("a", [1, 0], level=1, source="p"), _item("b", [0, 0], level=3, source="p")]
  table = metrics.format_table(metrics.summarize(results, ks=(1, 2)))
  header = table.splitlines()[1].split()
  assert header == ["group", "items", "accuracy", "stderr", "pass@1", "pass@2", "reward",
                    "length"]
  rows = {line.split()[0]: line.split() for line in table.splitlines()[3:]}
  assert set(rows) == {"all", "level=1", "level=3", "source=p"}
  assert rows["all"][1:3] == ["2", "0.250"] and rows["level=1"][5] == "1.000"


def _config(variant="tiny"):
  spec = importlib.util.spec_from_file_location("eval_config", REPO / "configs" / "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _records():
  return [Record(id=f"r{i}", question="How many?", answer=str(i), text_question="Two dots.",
                 pass_rate=None if i else 0.9) for i in range(3)]


def test_template_options_add_text_only_and_difficulty_hints():
  config = _config()
  config.template.text_only = True
  config.template.difficulty_hint = "all"
  template, records = eval_lib.template_for(config, _records())
  assert template.names == ("text_only", "format", "difficulty_hint")
  assert all(r.pass_rate == 0.0 for r in records)
  config.template.difficulty_hint = "hard"
  template, records = eval_lib.template_for(config, _records())
  assert [r.pass_rate for r in records] == [0.9, None, None]
  config.template.difficulty_hint = "sometimes"
  with pytest.raises(ValueError, match=r"config.template.difficulty_hint is 'sometimes'"):
    eval_lib.template_for(config, _records())


def test_variants_and_their_errors():
  assert _config("mathvista").data.layout == "mathvista"
  with pytest.raises(ValueError, match="unknown variant 'big'"):
    _config("big")
  config = _config("mathvista")
  with pytest.raises(ValueError, match="config.data.path is empty"):
    eval_lib.load_records(config)
  with pytest.raises(ValueError, match="give --workdir or --config.output"):
    eval_lib.output_paths(config, None)


def test_evaluate_tiny_hf_checkpoint_writes_report_and_items(tmp_path):
  from dprl.evaluation.rollout import tiny_model_config_for  # pylint: disable=g-import-not-at-top
  from dprl.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top

  # An HF folder holding a tiny model and its tokenizer, as save_pretrained writes them.
  tokenizer = tok_lib.load_tokenizer(tok_lib.write_small_tokenizer(tmp_path / "tok"))
  checkpoint = tmp_path / "ckpt"
  qwen2_5_vl.save_pretrained(qwen2_5_vl.init(tiny_model_config_for(tokenizer)), str(checkpoint))
  tokenizer.save_pretrained(checkpoint)
  config = _config("tiny")
  config.checkpoint = str(checkpoint)
  config.tokenizer = ""  # the checkpoint's
  config.data.num_items = 3
  config.rollout.update(num_samples=2, max_new_tokens=4, batch_size=2)
  config.metrics.pass_at_k = (1, 2)
  config.progress = False
  report = eval_lib.evaluate(config, workdir=str(tmp_path / "run"), print_table=False)
  written = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert written["summary"] == report["summary"]
  assert written["summary"]["num_items"] == 3 and written["summary"]["ks"] == [1, 2]
  assert written["config"]["rollout"]["num_samples"] == 2
  assert written["checkpoint"] == str(checkpoint)
  items = load_results(tmp_path / "run" / "eval.items.jsonl")
  assert len(items) == 3 and all(r.num_samples == 2 for r in items.values())


def _run_cli(*args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  env.pop("XLA_FLAGS", None)  # one CPU device is enough, and faster to start
  return subprocess.run([sys.executable, "-m", "dprl.eval", "--config",
                         str(REPO / "configs" / "eval.py") + ":tiny", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_cli_unknown_config_key_is_an_error_naming_it(tmp_path):
  out = _run_cli("--workdir", str(tmp_path), "--config.rollout.num_sample=2")
  assert out.returncode != 0
  assert "unknown config key 'rollout.num_sample'" in out.stderr
  assert "num_samples" in out.stderr  # the keys it could have meant


@pytest.mark.slow
def test_cli_end_to_end_on_the_tiny_config(tmp_path):
  out = _run_cli("--workdir", str(tmp_path), "--config.data.num_items=3",
                 "--config.rollout.num_samples=2", "--config.rollout.max_new_tokens=4",
                 "--config.rollout.batch_size=2", "--config.progress=False",
                 env_extra={"DPRL_CACHE_DIR": str(tmp_path / "cache")})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "level=" in out.stdout and "source=synthetic" in out.stdout
  report = json.loads((tmp_path / "eval.json").read_text())
  assert report["summary"]["num_items"] == 3 and report["checkpoint"] is None
  assert len((tmp_path / "eval.items.jsonl").read_text().splitlines()) == 3


def test_load_model_restores_an_orbax_run_directory(tmp_path):
  checkpointing = pytest.importorskip("dprl.rl.checkpointing")
  train_state = pytest.importorskip("dprl.rl.train_state")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dprl.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  from dprl.models.config import get_preset, to_hf_dict  # pylint: disable=g-import-not-at-top

  model_config = get_preset("tiny")
  model = qwen2_5_vl.init(model_config, seed=3)
  _, params, _ = train_state.split_params(model)
  state = train_state.create_train_state(params, optax.sgd(1e-3), seed=0)
  with checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints")) as checkpointer:
    checkpointer.save(7, state, meta={"model_config": to_hf_dict(model_config)}, force=True)
  config = _config("tiny")
  config.checkpoint = str(tmp_path / "run")
  loaded = eval_lib.load_model(config, tokenizer=None)
  expected, got = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))
  assert len(expected) == len(got)
  assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_load_model_rejects_a_folder_that_is_no_checkpoint(tmp_path):
  config = _config("tiny")
  config.checkpoint = str(tmp_path)
  with pytest.raises(ValueError, match="neither a Hugging Face folder"):
    eval_lib.load_model(config, tokenizer=None)
