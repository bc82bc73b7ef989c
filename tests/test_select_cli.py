"""`python -m dprl.select` (RAP) end to end on the tiny config: outputs, decisions that
match the stored scores, re-selection without sampling, resumption, the CLI with
`--config.init_checkpoint`.

The tiny model is random, so nothing here asserts what a trained model would show (e.g.
lower D for the synthetic language-prior items). A test reward with a fixed coin per
response text makes accuracies vary, so the CDE/ACE/DRM paths all see data.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

from dprl import select as select_lib
from dprl.curation import attention_confidence as ace_lib
from dprl.curation import rap
from dprl.data import pipeline as pipeline_lib
from dprl.data import readers
from dprl.data import synthetic
from dprl.data import tfds_builder
from dprl.data import tokenizer as tok_lib
from dprl.evaluation import rollout
from dprl.models import qwen2_5_vl
from dprl.rl import rewards
from dprl.sampling import SampleOutput

REPO = pathlib.Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("rap_config", REPO / "configs" / "rap.py")
rap_config = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rap_config)
COIN = "test_select_coin"

if COIN not in rewards.REWARD_FNS:

  @rewards.register_reward(COIN)
  def coin_reward(response: str, reference: str) -> tuple[float, bool]:
    """Correct for 3 of 4 response texts, fixed by a hash: varied accuracies on random
    weights, identical on a rerun."""
    del reference
    correct = zlib.crc32(response.encode()) % 4 != 0
    return float(correct), correct


def tiny_config(**select):
  config = rap_config.get_config("tiny")
  config.progress = False
  config.rollout.reward_fn = COIN
  config.select.cde_threshold = 0.0
  for key, value in select.items():
    config.select[key] = value
  return config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tok_lib.load_tokenizer(tok_lib.write_small_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tokenizer):
  return qwen2_5_vl.init(rollout.tiny_model_config_for(tokenizer), seed=0)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, model, tokenizer):
  workdir = tmp_path_factory.mktemp("rap")
  report = select_lib.run_selection(tiny_config(), workdir, model=model, tokenizer=tokenizer,
                                    print_table=False)
  return workdir, report


def read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def test_outputs_agree_with_the_stored_scores(first_run):
  workdir, report = first_run
  scores = rap.read_scores(workdir / "scores.jsonl")
  assert len(scores) == report["num_records"] == 12
  selection = rap.select(scores, rap.SelectionConfig(cde_threshold=0.0))
  assert report["counts"] == selection.report
  assert json.loads((workdir / "report.json").read_text())["counts"] == selection.report
  decisions = read_jsonl(workdir / "decisions.jsonl")
  assert [(d["id"], d["kept"], d["reason"]) for d in decisions] == [
      (d.score.id, d.kept, d.reason) for d in selection.decisions]
  for row in decisions:
    assert {"id", "acc_mm", "acc_text", "D", "max_psi", "kept", "reason"} <= set(row)
  # The coin reward gives every estimator something to do.
  counts = report["counts"]
  assert counts["removed_by_cde"] > 0 and counts["selected"] > 0
  assert any(s.language_prior for s in scores) and any(not s.language_prior for s in scores)

  subset = readers.read_records(workdir / "selected.jsonl", layout="dprl")
  assert [r.id for r in subset] == selection.selected
  by_id = {s.id: s for s in scores}
  for record in subset:
    assert record.pass_rate == by_id[record.id].acc_mm
    assert record.metadata["rap"]["D"] == by_id[record.id].discrepancy
    assert len(record.images) == 1
  source = tfds_builder.load_data_source(workdir / "tfds", config="rap")["train"]
  assert [tfds_builder.record_from_example(source[i]) for i in range(len(source))] == subset
  for name in ("discrepancy.png", "max_psi.png"):
    assert (workdir / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_question_only_prompts_drop_the_image_and_keep_the_question(tokenizer, model):
  config = tiny_config()
  record = synthetic.generate_split("count_color", "train", 1, seed=0,
                                    language_prior_fraction=0.0)[0]
  to_example = pipeline_lib.RecordToExample(
      tokenizer, select_lib.pipeline_config(config, model.config), pipeline_lib.BadRecordReport())
  image_pad = tok_lib.SpecialTokenIds.from_tokenizer(tokenizer).image_pad
  with_image = to_example.example(record)
  alone = to_example.example(select_lib.question_only(record))
  assert (with_image["input_ids"] == image_pad).sum() == 4
  assert (alone["input_ids"] == image_pad).sum() == 0 and alone["image_grid_thw"].size == 0
  assert record.question in alone["prompt"] and record.caption not in alone["prompt"]
  assert alone["prompt"] == with_image["prompt"].replace(
      "<|vision_start|><|image_pad|><|vision_end|>", "")


def forbid_scoring(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("sampled or scored again")
  monkeypatch.setattr(rollout, "rollout_records", fail)
  monkeypatch.setattr(ace_lib, "score_responses", fail)


def test_rerun_with_new_thresholds_selects_again_without_sampling(first_run, model, tokenizer,
                                                                  tmp_path, monkeypatch):
  workdir = tmp_path / "rerun"
  shutil.copytree(first_run[0], workdir)
  forbid_scoring(monkeypatch)
  report = select_lib.run_selection(tiny_config(cde_threshold=-1.0, use_ace=False), workdir,
                                    model=model, tokenizer=tokenizer, print_table=False)
  scores = rap.read_scores(workdir / "scores.jsonl")
  want = rap.select(scores, rap.SelectionConfig(cde_threshold=-1.0, use_ace=False))
  assert report["counts"] == want.report
  assert [r.id for r in readers.read_records(workdir / "selected.jsonl", layout="dprl")
          ] == want.selected

  changed = tiny_config()
  changed.rollout.temperature = 0.5
  with pytest.raises(select_lib.SelectionError, match=r"config\.rollout\.temperature differ"):
    select_lib.run_selection(changed, workdir, model=model, tokenizer=tokenizer)
  with pytest.raises(select_lib.SelectionError, match=r"config\.select: cde_threshold"):
    select_lib.run_selection(tiny_config(cde_threshold=2.0), workdir, model=model,
                             tokenizer=tokenizer)


def test_resumed_run_scores_only_the_rest_and_matches(first_run, model, tokenizer, tmp_path,
                                                      monkeypatch):
  workdir = tmp_path / "resume"
  shutil.copytree(first_run[0], workdir)
  for name in ("decisions.jsonl", "report.json", "selected.jsonl"):
    os.remove(workdir / name)
  # Killed mid-way: the text rollouts after 2 of 3 chunks, ACE after 2 items (and a
  # half-written line in each file).
  for name, keep in (("rollouts_text.jsonl", 8), ("scores.jsonl", 2)):
    lines = (workdir / name).read_text().splitlines(keepends=True)
    (workdir / name).write_text("".join(lines[:keep]) + lines[keep][:25])
  scored = []
  real = ace_lib.score_responses
  monkeypatch.setattr(ace_lib, "score_responses",
                      lambda model, tok, records, *a, **k: scored.extend(
                          r.id for r in records) or real(model, tok, records, *a, **k))
  report = select_lib.run_selection(tiny_config(), workdir, model=model, tokenizer=tokenizer,
                                    print_table=False)
  before = rap.read_scores(first_run[0] / "scores.jsonl")
  after = rap.read_scores(workdir / "scores.jsonl")
  assert scored == [s.id for s in before[2:]]
  assert [s.id for s in after] == [s.id for s in before]
  for a, b in zip(after, before):
    assert (a.mm_correct, a.text_correct, a.max_psi_token) == (b.mm_correct, b.text_correct,
                                                               b.max_psi_token)
    np.testing.assert_allclose(a.log_max_psi, b.log_max_psi, rtol=1e-5)
  assert report["counts"] == first_run[1]["counts"]
  assert read_jsonl(workdir / "rollouts_text.jsonl") == read_jsonl(
      first_run[0] / "rollouts_text.jsonl")


def test_ace_teacher_forces_the_sampled_ids_and_falls_back_for_old_rollouts(
    model, tokenizer, tmp_path, monkeypatch, caplog):
  # Every rollout samples "<think>" spelt out character by character, then " 3." and the
  # end token: its text would encode back to the single <think> token.
  eos = tok_lib.SpecialTokenIds.from_tokenizer(tokenizer).eos
  spelt = [i for c in "<think>" for i in tokenizer.encode(c, add_special_tokens=False)]
  sampled = spelt + tokenizer.encode(" 3.", add_special_tokens=False) + [eos]

  def generate(model, input_ids, attention_mask, pixel_values, image_grid_thw, *,
               num_samples, **kwargs):
    del model, attention_mask, pixel_values, image_grid_thw, kwargs
    rows = len(input_ids) * num_samples
    tokens = np.tile(np.asarray(sampled, np.int32), (rows, 1))
    lengths = np.full((rows,), len(sampled), np.int32)
    return SampleOutput(tokens, np.zeros(tokens.shape, np.float32), lengths,
                        np.ones(tokens.shape, np.int32))

  monkeypatch.setattr(rollout, "generate", generate)
  config = tiny_config()
  config.data.max_items = 2
  config.rollout.max_new_tokens = len(sampled)  # "ended" is then unknowable from lengths
  records = synthetic.generate_split("count_color", "train", 2, seed=0)
  prompts = select_lib.pipeline_config(config, model.config)
  settings = select_lib.ace_config(config)
  reencoded = ace_lib.response_token_ids(tokenizer, "<think> 3.", True, eos)
  assert reencoded != sampled
  want = ace_lib.score_responses(model, tokenizer, records, [sampled] * 2,
                                 pipeline_config=prompts, config=settings)
  fallback = ace_lib.score_responses(model, tokenizer, records, [reencoded[:-1]] * 2,
                                     pipeline_config=prompts, config=settings)
  assert [a.log_max_psi for a in want] != pytest.approx([a.log_max_psi for a in fallback])

  workdir = tmp_path / "sampled"
  scores = select_lib.score_records(config, workdir, model, tokenizer, records)
  assert [s.log_max_psi for s in scores] == pytest.approx([a.log_max_psi for a in want])
  assert [s.max_psi_token for s in scores] == [a.token for a in want]
  stored = read_jsonl(workdir / "rollouts_mm.jsonl")
  assert all(row["response_token_ids"] == [sampled] * 4 for row in stored)

  # A workdir from before the ids were kept: the text is encoded again (no end token, as
  # the response used all max_new_tokens), with a warning saying so.
  for row in stored:
    del row["response_token_ids"]
  (workdir / "rollouts_mm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stored))
  os.remove(workdir / "scores.jsonl")
  with caplog.at_level("WARNING", logger=select_lib.log.name):
    scores = select_lib.score_records(config, workdir, model, tokenizer, records)
  assert "2 of 2 records' rollouts were stored without their sampled token ids" in caplog.text
  assert [s.log_max_psi for s in scores] == pytest.approx([a.log_max_psi for a in fallback])


@pytest.mark.slow
def test_cli_with_init_checkpoint_matches_the_in_process_model(first_run, model, tmp_path):
  checkpoint = tmp_path / "ckpt"
  qwen2_5_vl.save_pretrained(model, os.fspath(checkpoint))
  workdir = tmp_path / "cli"
  env = dict(os.environ)  # the test session's XLA flags: the same numerics
  proc = subprocess.run(
      [sys.executable, "-m", "dprl.select", "--config", "configs/rap.py:tiny",
       f"--workdir={workdir}", f"--config.init_checkpoint={checkpoint}",
       "--config.progress=False", "--config.data.max_items=4"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "removed by CDE (D <= threshold)" in proc.stdout
  assert "selected" in proc.stdout
  report = json.loads((workdir / "report.json").read_text())
  assert report["config"]["init_checkpoint"] == str(checkpoint)
  assert report["counts"]["total"] == 4
  # Same weights, seeds and chunks as the in-process run: the same responses.
  cli = {r["id"]: r["responses"] for r in read_jsonl(workdir / "rollouts_mm.jsonl")}
  ours = {r["id"]: r["responses"] for r in read_jsonl(first_run[0] / "rollouts_mm.jsonl")}
  assert cli == {k: ours[k] for k in cli}
  for name in ("decisions.jsonl", "selected.jsonl", "plots/discrepancy.png",
               "plots/max_psi.png", "scores.jsonl"):
    assert (workdir / name).exists(), name
