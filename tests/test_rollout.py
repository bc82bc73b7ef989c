"""The rollout engine: sample K responses per record on a tiny random model, decode, score;
determinism by seed, resumption from a results file, the per-item callback."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dprl.data import templates
from dprl.data import tokenizer as tok_lib
from dprl.data.pipeline import BadRecordReport
from dprl.data.synthetic import generate_split
from dprl.evaluation import rollout as ro
from dprl.models import qwen2_5_vl
from dprl.models.config import get_preset
from dprl.sampling import SampleOutput

K = 2
SAMPLING = dict(num_samples=K, max_new_tokens=6, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tok_lib.load_tokenizer(tok_lib.write_small_tokenizer(tmp_path_factory.mktemp("tok") / "small"))


@pytest.fixture(scope="module")
def model(tokenizer):
  return qwen2_5_vl.init(ro.tiny_model_config_for(tokenizer), seed=0)


@pytest.fixture(scope="module")
def records():
  return generate_split("count_color", "test", 5, seed=0)


@pytest.fixture(scope="module")
def full_run(model, tokenizer, records):
  return ro.rollout_records(model, tokenizer, records, seed=0, **SAMPLING)


def test_tiny_model_config_takes_vocab_and_special_ids_from_the_tokenizer(tokenizer):
  cfg = ro.tiny_model_config_for(tokenizer)
  special = tok_lib.SpecialTokenIds.from_tokenizer(tokenizer)
  assert cfg.text.vocab_size == len(tokenizer) == 382
  assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
      special.image_pad, special.vision_start, special.vision_end)
  assert cfg.text.hidden_size == get_preset("tiny").text.hidden_size
  ro.check_tokenizer_fits(cfg, tokenizer)


def test_a_tokenizer_larger_than_the_model_vocab_is_an_error(tokenizer):
  with pytest.raises(ValueError, match=r"382 tokens but the model's vocab_size is 300"):
    ro.check_tokenizer_fits(get_preset("tiny"), tokenizer)


def test_eos_ids_are_im_end_and_endoftext(tokenizer):
  assert ro.eos_token_ids(tokenizer) == (tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                         tokenizer.convert_tokens_to_ids("<|endoftext|>"))


def test_rollout_gives_k_scored_responses_per_record_in_record_order(full_run, records):
  assert [r.id for r in full_run] == [r.id for r in records]
  for result, record in zip(full_run, records):
    assert (result.source, result.level, result.answer) == (record.source, record.level,
                                                            record.answer)
    assert len(result.responses) == len(result.correct) == len(result.rewards) == K
    assert all(1 <= n <= SAMPLING["max_new_tokens"] for n in result.response_lengths)
    assert all(isinstance(text, str) for text in result.responses)
    assert result.pass_rate == np.mean(result.correct)
    # The sampled ids are kept, one per generated token.
    assert [len(ids) for ids in result.response_token_ids] == result.response_lengths


def test_rollout_is_deterministic_by_seed(model, tokenizer, records, full_run):
  again = ro.rollout_records(model, tokenizer, records, seed=0, **SAMPLING)
  other = ro.rollout_records(model, tokenizer, records, seed=1, **SAMPLING)
  assert again == full_run
  assert [r.responses for r in other] != [r.responses for r in full_run]


def test_resume_skips_scored_ids_and_equals_an_uninterrupted_run(
    model, tokenizer, records, full_run, tmp_path, monkeypatch):
  # A run killed after chunk 0 and the first item of chunk 1 (batch_size 2).
  path = tmp_path / "items.jsonl"
  ro.write_results(full_run[:3], path)
  calls = []
  real_generate = ro.generate
  monkeypatch.setattr(ro, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
  seen = []
  writer = ro.ResultWriter(path)
  resumed = ro.rollout_records(model, tokenizer, records, seed=0, resume_from=path,
                               on_result=lambda r: (seen.append(r.id), writer(r)), **SAMPLING)
  assert seen == [r.id for r in records[3:]]
  assert len(calls) == 2  # chunks 1 and 2; chunk 0 is fully scored
  assert resumed == full_run
  assert list(ro.load_results(path).values()) == full_run


def test_on_result_is_called_once_per_record(model, tokenizer, records):
  seen = []
  ro.rollout_records(model, tokenizer, records, seed=0, on_result=lambda r: seen.append(r.id),
                     **SAMPLING)
  assert seen == [r.id for r in records]


def test_bad_records_are_skipped_and_counted(model, tokenizer, records):
  bad = [records[0].replace(id="no-answer", answer=" "), *records[:2]]
  report = BadRecordReport()
  results = ro.rollout_records(model, tokenizer, bad, seed=0, bad_records=report, **SAMPLING)
  assert [r.id for r in results] == [r.id for r in records[:2]]
  assert report.counts == {"missing_answer": 1}


def _fake_generate(tokenizer, responses_by_sample):
  """A `generate` whose sample j of every prompt is `responses_by_sample[j]` + <|im_end|>."""
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  encoded = [tokenizer.encode(text, add_special_tokens=False) + [eos]
             for text in responses_by_sample]
  width = max(len(ids) for ids in encoded) + 2

  def generate(model, input_ids, attention_mask, pixel_values, image_grid_thw, *,
               num_samples, **kwargs):
    del model, attention_mask, pixel_values, image_grid_thw, kwargs
    rows = [encoded[j] for _ in range(len(input_ids)) for j in range(num_samples)]
    tokens = np.zeros((len(rows), width), np.int32)
    for i, ids in enumerate(rows):
      tokens[i, :len(ids)] = ids
    lengths = np.asarray([len(ids) for ids in rows], np.int32)
    mask = (np.arange(width) < lengths[:, None]).astype(np.int32)
    return SampleOutput(tokens, np.zeros(tokens.shape, np.float32), lengths, mask)

  return generate, [len(ids) for ids in encoded]


def test_responses_are_decoded_with_think_kept_and_scored_per_item(
    model, tokenizer, records, monkeypatch):
  answers = [r.answer for r in records]
  guesses = [answers[0], "99"]  # sample 0 answers like item 0, sample 1 is always wrong
  texts = [f"<think>count</think> \\boxed{{{g}}}" for g in guesses]
  fake, lengths = _fake_generate(tokenizer, texts)
  monkeypatch.setattr(ro, "generate", fake)
  # batch_size 3 over 5 records: the last chunk holds one padding copy, which is dropped.
  results = ro.rollout_records(model, tokenizer, records, num_samples=2, max_new_tokens=8,
                               batch_size=3, progress=False)
  assert len(results) == len(records)
  for result in results:
    assert result.responses == texts
    assert result.response_lengths == lengths
    assert result.correct == [result.answer == answers[0], False]
    # math reward: 0.9 accuracy + 0.1 format (think block, then a boxed answer).
    assert result.rewards == pytest.approx([0.9 * (result.answer == answers[0]) + 0.1, 0.1])


def test_sampled_ids_are_kept_where_encoding_the_text_again_differs(
    model, tokenizer, records, monkeypatch, tmp_path):
  # A sampler may spell "<think>" out character by character; its text encodes back to the
  # single <think> token, so only the kept ids say what was sampled.
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  spelt = [i for c in "<think>" for i in tokenizer.encode(c, add_special_tokens=False)]
  sampled = spelt + tokenizer.encode(" 7", add_special_tokens=False) + [eos]

  def generate(model, input_ids, attention_mask, pixel_values, image_grid_thw, *,
               num_samples, **kwargs):
    del model, attention_mask, pixel_values, image_grid_thw, kwargs
    rows = len(input_ids) * num_samples
    tokens = np.zeros((rows, len(sampled) + 3), np.int32)  # padded after the end token
    tokens[:, :len(sampled)] = sampled
    lengths = np.full((rows,), len(sampled), np.int32)
    mask = (np.arange(tokens.shape[1]) < lengths[:, None]).astype(np.int32)
    return SampleOutput(tokens, np.zeros(tokens.shape, np.float32), lengths, mask)

  monkeypatch.setattr(ro, "generate", generate)
  path = tmp_path / "items.jsonl"
  results = ro.rollout_records(model, tokenizer, records[:2], num_samples=2, batch_size=2,
                               on_result=ro.ResultWriter(path), progress=False)
  for result in results:
    assert result.responses == ["<think> 7"] * 2
    assert result.response_token_ids == [sampled] * 2
    assert tokenizer.encode(result.responses[0], add_special_tokens=False) + [eos] != sampled
  assert list(ro.load_results(path).values()) == results  # kept in the resumable file


def test_results_written_before_token_ids_were_kept_still_load(full_run, tmp_path):
  old = {k: v for k, v in full_run[0].to_json().items() if k != "response_token_ids"}
  path = tmp_path / "items.jsonl"
  path.write_text(json.dumps(old) + "\n")
  (loaded,) = ro.load_results(path).values()
  assert loaded.response_token_ids is None
  assert loaded == dataclasses.replace(full_run[0], response_token_ids=None)
  broken = full_run[0].to_json()
  broken["response_token_ids"] = [ids[:-1] for ids in broken["response_token_ids"]]
  with pytest.raises(ValueError, match=r"f.jsonl:3: result .* response_token_ids of lengths"):
    ro.ItemResult.from_json(broken, "f.jsonl:3")


def test_text_only_template_samples_without_images(model, tokenizer, records, monkeypatch):
  fake, _ = _fake_generate(tokenizer, ["\\boxed{1}"])
  seen = []

  def spy(model, input_ids, attention_mask, pixel_values, image_grid_thw, **kwargs):
    seen.append((input_ids, pixel_values, image_grid_thw))
    return fake(model, input_ids, attention_mask, pixel_values, image_grid_thw, **kwargs)

  monkeypatch.setattr(ro, "generate", spy)
  template = templates.TemplateConfig(names="text_only+format")
  results = ro.rollout_records(model, tokenizer, records[:2], template=template,
                               batch_size=2, progress=False)
  assert len(results) == 2
  (input_ids, pixel_values, grid), = seen
  assert pixel_values is None and grid is None
  assert not (input_ids == model.config.image_token_id).any()
  prompt = tokenizer.decode(input_ids[0], skip_special_tokens=True)
  assert records[0].text_question in prompt


def test_load_results_ignores_a_torn_last_line_but_not_a_bad_middle_line(full_run, tmp_path):
  path = tmp_path / "items.jsonl"
  ro.write_results(full_run[:2], path)
  with path.open("a") as f:
    f.write('{"id": "cut off')
  assert list(ro.load_results(path)) == [r.id for r in full_run[:2]]
  writer = ro.ResultWriter(path)  # ends the torn line, so the next result is readable
  writer(full_run[2])
  assert list(ro.load_results(path)) == [r.id for r in full_run[:3]]
  lines = path.read_text().splitlines()
  path.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
  with pytest.raises(ValueError, match=r"items.jsonl:2: not valid JSON"):
    ro.load_results(path)


def test_writer_keeps_a_whole_last_line_that_only_lost_its_newline(tmp_path):
  result = ro.ItemResult(id="a", source="s", level=None, answer="1", responses=["x"],
                         correct=[True], rewards=[1.0], response_lengths=[3])
  path = tmp_path / "items.jsonl"
  path.write_text(json.dumps(result.to_json()))
  ro.ResultWriter(path)(result.__class__(**{**result.to_json(), "id": "b"}))
  assert list(ro.load_results(path)) == ["a", "b"]


def test_resume_with_another_num_samples_is_an_error(model, tokenizer, records, full_run,
                                                     tmp_path):
  path = ro.write_results(full_run[:1], tmp_path / "items.jsonl")
  with pytest.raises(ValueError, match=r"has 2 responses but this run samples num_samples=3"):
    ro.rollout_records(model, tokenizer, records, num_samples=3, resume_from=path,
                       progress=False)


def test_item_result_json_round_trip_and_field_errors(full_run):
  result = full_run[0]
  assert ro.ItemResult.from_json(json.loads(json.dumps(result.to_json()))) == result
  broken = result.to_json()
  del broken["rewards"]
  with pytest.raises(ValueError, match=r"f.jsonl:7: result is missing field\(s\) \['rewards'\]"):
    ro.ItemResult.from_json(broken, "f.jsonl:7")


def test_duplicate_record_ids_are_an_error(model, tokenizer, records):
  with pytest.raises(ValueError, match="duplicate ids"):
    ro.rollout_records(model, tokenizer, [records[0], records[0]], progress=False)
