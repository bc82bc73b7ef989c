"""`python -m dprl.curate` end to end on the tiny config: outputs, resumption, reruns.

A random tiny model never answers right, so most tests score with `BY_ANSWER`, a reward
registered here that calls a response right with a probability set by the reference
answer (a hash of the response is the coin): answer "1" is never right, "9" always, the
rest in between, so the histogram has both ends and a middle, like a real one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
from absl import flags

from dprl import curate as curate_lib
from dprl.curation import difficulty
from dprl.data import readers
from dprl.data import templates
from dprl.data import tfds_builder
from dprl.data.synthetic import generate_split
from dprl.evaluation import rollout
from dprl.rl import rewards

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "configs" / "curate.py"
BY_ANSWER = "test_curation_by_answer"
NUM_ITEMS = 10
CALLS = {"count": 0}  # responses scored by BY_ANSWER, to see what a run sampled


def _by_answer(response: str, reference: str, **params):
  del params
  CALLS["count"] += 1
  right_of_8 = min(max(int(reference) - 1, 0), 8) if reference.isdigit() else 4
  coin = hashlib.sha256(response.encode()).digest()[0] % 8
  correct = coin < right_of_8
  return float(correct), correct


if BY_ANSWER not in rewards.REWARD_FNS:
  rewards.register_reward(BY_ANSWER)(_by_answer)


def _load_config_module():
  spec = importlib.util.spec_from_file_location("curate_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(**overrides):
  config = _load_config_module().get_config("tiny")
  config.data.num_items = NUM_ITEMS
  config.sampling.max_new_tokens = 4
  config.sampling.batch_size = 4  # chunks of 4, 4, 2
  config.sampling.reward_fn = BY_ANSWER
  config.progress = False
  config.output.dataset_name = "curated"
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


@pytest.fixture(scope="module")
def tokenizer():
  return curate_lib.load_tokenizer(_config())


@pytest.fixture(scope="module")
def model(tokenizer):
  # Loaded as the CLI loads it, so the CLI test reuses the compiled sampler.
  return curate_lib.load_model(_config(), tokenizer)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model, tokenizer):
  """One uninterrupted run, shared by the tests that compare against it."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  CALLS["count"] = 0
  report = curate_lib.curate(_config(), workdir, model=model, tokenizer=tokenizer,
                             print_table=False)
  return workdir, report, CALLS["count"]


def _outputs(workdir: pathlib.Path) -> dict[str, object]:
  """Everything a run writes, comparable across workdirs."""
  files = ["scores.jsonl", "stage1.jsonl", "stage2.jsonl", "histogram.json",
           "templates.json", "scoring_config.json"]
  out: dict[str, object] = {name: (workdir / name).read_text() for name in files}
  report = json.loads((workdir / "report.json").read_text())
  out["report"] = report
  for split in report["outputs"]["tfds"]["splits"]:
    source = tfds_builder.load_data_source(workdir / "tfds", config="curated")[split]
    out[f"tfds/{split}"] = [tfds_builder.record_from_example(source[i])
                            for i in range(len(source))]
  return out


def test_curation_writes_consistent_stage_datasets(finished):
  workdir, report, calls = finished
  assert calls == NUM_ITEMS * 8  # every prompt sampled K = 8 times, once
  scores = rollout.load_results(workdir / "scores.jsonl")
  assert len(scores) == NUM_ITEMS
  counts = report["counts"]
  assert counts["scored"] == NUM_ITEMS
  assert counts["kept"] + sum(counts["dropped"].values()) == NUM_ITEMS
  assert counts["kept"] > 0 and counts["dropped"]["never_right"] > 0

  hist = json.loads((workdir / "histogram.json").read_text())
  assert [b["count"] for b in hist["bins"]] == [
      sum(r.num_correct == c for r in scores.values()) for c in range(9)]
  assert (workdir / "histogram.png").read_bytes()[:4] == b"\x89PNG"

  stage_templates = json.loads((workdir / "templates.json").read_text())
  stage2_template = templates.TemplateConfig(**stage_templates["stage2"])
  assert stage2_template.names == ("format", "difficulty_hint")
  for stage in ("stage1", "stage2"):
    records = readers.read_records(workdir / f"{stage}.jsonl", layout="dprl", strict=True)
    assert len(records) == counts[stage]
    for record in records:
      score = scores[record.id]
      assert record.pass_rate == score.pass_rate
      assert 1 <= score.num_correct <= 6  # K = 8, [0.1, 0.87] -> 1..6 correct
      assert record.metadata["curation"]["stage"] == stage
      assert len(record.images) == 1
      hinted = stage2_template.hint in templates.build_prompt(record,
                                                              stage2_template).after_question
      assert record.metadata["hint"] == hinted == (stage == "stage2" and
                                                   record.pass_rate < 0.3)
    if records:
      source = tfds_builder.load_data_source(workdir / "tfds", config="curated")[stage]
      assert [tfds_builder.record_from_example(source[i])
              for i in range(len(source))] == records


def test_killed_run_resumes_sampling_only_the_missing_prompts(finished, tmp_path, model,
                                                              tokenizer):
  done, _, _ = finished
  # A run killed in the third chunk: two whole chunks (8 prompts) scored, the 9th line
  # half-written, no outputs yet.
  lines = (done / "scores.jsonl").read_text().splitlines(keepends=True)
  (tmp_path / "scores.jsonl").write_text("".join(lines[:8]) + lines[8][:40])
  shutil.copy(done / "scoring_config.json", tmp_path / "scoring_config.json")
  CALLS["count"] = 0
  curate_lib.curate(_config(), tmp_path, model=model, tokenizer=tokenizer, print_table=False)
  assert CALLS["count"] == 2 * 8  # the last chunk's two prompts, K = 8 each
  assert _outputs(tmp_path) == _outputs(done)


def test_rerun_with_a_new_interval_recurates_without_sampling(finished, tmp_path, model,
                                                             tokenizer):
  done, report, _ = finished
  for name in ("scores.jsonl", "scoring_config.json"):
    shutil.copy(done / name, tmp_path / name)
  CALLS["count"] = 0
  config = _config(**{"filter.min_correct": 2, "split.rule": "size", "split.stage2_size": 1})
  again = curate_lib.curate(config, tmp_path, model=model, tokenizer=tokenizer,
                            print_table=False)
  assert CALLS["count"] == 0
  assert again["counts"]["scored"] == report["counts"]["scored"]
  assert again["counts"]["min_correct"] == 2
  assert again["counts"]["stage2"] == min(1, again["counts"]["kept"])


def test_resuming_with_other_sampling_settings_is_refused(finished, tmp_path, model,
                                                          tokenizer):
  done, _, _ = finished
  for name in ("scores.jsonl", "scoring_config.json"):
    shutil.copy(done / name, tmp_path / name)
  with pytest.raises(difficulty.CurationError,
                     match=r"config\.sampling\.num_samples, config\.sampling\.seed differ"):
    curate_lib.curate(_config(**{"sampling.num_samples": 4, "sampling.seed": 1}), tmp_path,
                      model=model, tokenizer=tokenizer, print_table=False)


def test_bad_interval_is_refused_before_anything_is_sampled(tmp_path):
  with pytest.raises(difficulty.CurationError,
                     match=r"config\.filter \(with config\.sampling\.num_samples=4\)"):
    curate_lib.curate(_config(**{"sampling.num_samples": 4, "filter.low": 0.3,
                                 "filter.high": 0.45}), tmp_path, print_table=False)
  with pytest.raises(difficulty.CurationError, match=r"config\.split\.rule: unknown"):
    curate_lib.curate(_config(**{"split.rule": "quantil"}), tmp_path, print_table=False)
  with pytest.raises(difficulty.CurationError, match=r"config\.output\.dataset_name='a/b'"):
    curate_lib.curate(_config(**{"output.dataset_name": "a/b"}), tmp_path, print_table=False)
  assert not (tmp_path / "scores.jsonl").exists()


def test_torn_last_line_is_cut_and_a_whole_one_kept(tmp_path):
  path = tmp_path / "scores.jsonl"
  path.write_text('{"id": "a"}\n{"id": "b", "resp')
  curate_lib.drop_torn_tail(path)
  assert path.read_text() == '{"id": "a"}\n'
  path.write_text('{"id": "a"}\n{"id": "b"}')  # killed between the line and its newline
  curate_lib.drop_torn_tail(path)
  assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_scores_without_their_settings_are_refused(tmp_path, model, tokenizer):
  (tmp_path / "scores.jsonl").write_text('{"id": "a"}\n')
  with pytest.raises(difficulty.CurationError, match="scoring_config.json does not"):
    curate_lib.curate(_config(), tmp_path, model=model, tokenizer=tokenizer,
                      print_table=False)


def test_user_jsonl_is_curated_like_the_synthetic_split(finished, tmp_path, model, tokenizer):
  done, _, _ = finished
  records = generate_split("count_color", "train", NUM_ITEMS, seed=0, image_size=56)
  path = readers.write_jsonl(records, tmp_path / "data" / "train.jsonl")
  config = _config(**{"data.source": "file", "data.path": str(path), "data.layout": "dprl"})
  curate_lib.curate(config, tmp_path / "run", model=model, tokenizer=tokenizer,
                    print_table=False)
  # Same records, same chunks, same seed: the same scores as the synthetic source.
  assert (rollout.load_results(tmp_path / "run" / "scores.jsonl") ==
          rollout.load_results(done / "scores.jsonl"))


def test_cli_flags_override_the_locked_config(tmp_path, capsys, model):
  del model  # built first, so this run reuses its compiled sampler
  argv = ["curate", "--config", f"{CONFIG_FILE}:tiny", f"--workdir={tmp_path}",
          "--config.data.num_items=4", "--config.sampling.max_new_tokens=4",
          "--config.sampling.batch_size=4", "--config.progress=False"]
  flag_values = flags.FlagValues()
  curate_lib.define_flags(flag_values, argv)
  curate_lib.main(curate_lib.parse_flags(argv, flag_values), flag_values)
  table = capsys.readouterr().out
  assert "dropped: never_right" in table
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["counts"]["scored"] == 4 and report["config"]["data"]["num_items"] == 4
  # A random model is never right (the "math" reward): everything is dropped, and the
  # empty stages are written as empty JSONL files and no TFDS split.
  assert report["counts"]["dropped"]["never_right"] == 4
  assert report["outputs"]["tfds"]["splits"] == []
  assert (tmp_path / "stage1.jsonl").read_text() == ""


def test_cli_names_a_misspelt_config_key(capsys):
  argv = ["curate", f"--config={CONFIG_FILE}:tiny", "--workdir=unused",
          "--config.filter.lowe=0.2"]
  flag_values = flags.FlagValues()
  curate_lib.define_flags(flag_values, argv)
  with pytest.raises(SystemExit):
    curate_lib.parse_flags(argv, flag_values)
  assert "unknown config key 'filter.lowe' (config.filter has no 'lowe'" in (
      capsys.readouterr().err)


@pytest.mark.slow
def test_cli_runs_as_a_module(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "dprl.curate", "--config", f"{CONFIG_FILE}:tiny",
       "--workdir", str(tmp_path), "--config.data.num_items=2",
       "--config.sampling.num_samples=2", "--config.sampling.max_new_tokens=2",
       "--config.sampling.batch_size=2", "--config.progress=False"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "prompts scored" in result.stdout
  assert json.loads((tmp_path / "report.json").read_text())["counts"]["scored"] == 2
