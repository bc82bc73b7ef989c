"""The grain pipeline: batches, parity with transformers' pieces, shuffle/shard/resume,
bad records skipped-and-counted or fatal."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dprl.data import image_processing as ip
from dprl.data import pipeline as pl
from dprl.data import templates
from dprl.data import tokenizer as tok_lib
from dprl.data.records import BadRecordError, Record

SMALL_PIXELS = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 16)


def _png(height=56, width=56, seed=0, mode="RGB"):
  rng = np.random.default_rng(seed)
  image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
  buffer = io.BytesIO()
  image.convert(mode).save(buffer, "PNG")
  return buffer.getvalue()


def _records(n=10):
  sizes = [(56, 56), (56, 84), (84, 56), (112, 112), (40, 70)]
  return [Record(id=f"r{i}", question=f"How many squares are in picture {i}?",
                 answer=str(i % 4), images=(_png(*sizes[i % len(sizes)], seed=i),),
                 caption=f"{i % 4} squares.", text_question=f"There are {i % 4} squares. How many?",
                 source="synthetic", level=i % 3, pass_rate=i / n) for i in range(n)]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  return tok_lib.write_small_tokenizer(tmp_path_factory.mktemp("tok") / "small")


@pytest.fixture(scope="module")
def tokenizer(small_dir):
  return tok_lib.load_tokenizer(small_dir)


def _config(**changes):
  defaults = dict(batch_size=4, seed=0, num_threads=2, max_prompt_length=512, **SMALL_PIXELS)
  defaults.update(changes)
  return pl.PipelineConfig(**defaults)


def _pipeline(records, tokenizer, **changes):
  return pl.Pipeline(records, tokenizer, _config(**changes), process_index=0, process_count=1)


def _all_ids(pipeline):
  return [rid for batch in pipeline for rid in batch["id"]]


def test_batches_are_left_padded_to_a_bucket(tokenizer):
  records = _records(10)
  batches = list(_pipeline(records, tokenizer))
  assert [len(b["id"]) for b in batches] == [4, 4, 2]
  for batch in batches:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape[1] in (32, 64, 128, 256, 512)
    assert ids.shape[1] // 2 < mask.sum(axis=1).max() <= ids.shape[1]
    for row, length in zip(range(len(ids)), mask.sum(axis=1)):
      assert (mask[row, -length:] == 1).all() and (mask[row, :-length] == 0).all()
      assert (ids[row, :-length] == 0).all()  # the small tokenizer's pad id
    # Every prompt ends where generation starts: "<|im_start|>assistant\n".
    assert (ids[:, -1] == tokenizer.convert_tokens_to_ids("\n")).all()
    assert batch["pixel_values"].dtype == np.float32
    assert batch["pixel_values"].shape[1] == 1176
    assert batch["image_grid_thw"].dtype == np.int32
    assert batch["pixel_values"].shape[0] == np.prod(batch["image_grid_thw"], axis=1).sum()
    assert batch["num_images"].tolist() == [1] * len(batch["id"])
  by_id = {r.id: r for r in records}
  batch = batches[0]
  for key in ("answer", "source", "level", "pass_rate"):
    assert batch[key] == [getattr(by_id[rid], key) for rid in batch["id"]]
  assert sorted(_all_ids(_pipeline(records, tokenizer))) == sorted(by_id)


def test_examples_match_transformers_processor_pieces(tokenizer):
  """Per example: ids = the HF processor's recipe (pads expanded in the text, then
  tokenized), pixels = Qwen2VLImageProcessorPil's, both in batch order."""
  pil_module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
  reference_processor = pil_module.Qwen2VLImageProcessorPil(**SMALL_PIXELS)
  records = _records(6)
  by_id = {r.id: r for r in records}
  config = templates.TemplateConfig(names="caption+format")
  batch = next(iter(_pipeline(records, tokenizer, batch_size=6, template=config)))
  offset = 0
  for row, rid in enumerate(batch["id"]):
    record = by_id[rid]
    images = [Image.open(io.BytesIO(b)) for b in record.images]
    ref = reference_processor(images=images)
    ref_pixels, ref_grid = np.asarray(ref["pixel_values"]), np.asarray(ref["image_grid_thw"])
    text = templates.render_prompt(record, tokenizer, config)
    assert batch["prompt"][row] == text
    # transformers' Qwen2_5_VLProcessor expands each <|image_pad|> in the text.
    num_tokens = int(np.prod(ref_grid[0])) // 4
    expected_ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * num_tokens),
                             add_special_tokens=False)["input_ids"]
    length = batch["attention_mask"][row].sum()
    assert batch["input_ids"][row, -length:].tolist() == expected_ids
    np.testing.assert_array_equal(batch["image_grid_thw"][row], ref_grid[0])
    patches = batch["pixel_values"][offset:offset + len(ref_pixels)]
    assert np.abs(patches - ref_pixels).max() <= 1e-5
    offset += len(ref_pixels)
  assert offset == len(batch["pixel_values"])


def test_full_qwen_tokenizer_runs_the_same_pipeline(tmp_path):
  tokenizer = tok_lib.load_tokenizer(tok_lib.write_qwen2_5_vl_tokenizer(tmp_path / "qwen"))
  batch = next(iter(_pipeline(_records(2), tokenizer, batch_size=2)))
  pad_id = 151655
  for row in range(2):
    ids = batch["input_ids"][row]
    assert (ids == pad_id).sum() == np.prod(batch["image_grid_thw"][row]) // 4
  assert (batch["input_ids"][batch["attention_mask"] == 0] == 151643).all()


def test_shuffle_is_seeded_and_reseeded_each_epoch(tokenizer):
  records = _records(10)
  first = _all_ids(_pipeline(records, tokenizer, seed=1))
  assert first == _all_ids(_pipeline(records, tokenizer, seed=1))
  assert first != _all_ids(_pipeline(records, tokenizer, seed=2))
  assert _all_ids(_pipeline(records, tokenizer, shuffle=False)) == [r.id for r in records]
  two_epochs = _all_ids(_pipeline(records, tokenizer, seed=1, num_epochs=2))
  assert two_epochs[:10] == first and sorted(two_epochs[10:]) == sorted(first)
  assert two_epochs[10:] != first


def test_hosts_get_disjoint_equal_shards(tokenizer):
  records = _records(11)
  shards = [_all_ids(pl.Pipeline(records, tokenizer, _config(), process_index=i,
                                 process_count=3)) for i in range(3)]
  assert [len(s) for s in shards] == [3, 3, 3]  # 11 // 3 each; two records wait an epoch
  assert len(set().union(*shards)) == 9


def test_default_shard_is_jax_process(tokenizer):
  pipeline = pl.Pipeline(_records(3), tokenizer, _config())
  assert len(_all_ids(pipeline)) == 3  # process 0 of 1 on this machine


def test_iterator_state_round_trip_resumes_exactly(tokenizer):
  pipeline = _pipeline(_records(10), tokenizer, batch_size=3, num_epochs=2)
  iterator = iter(pipeline)
  next(iterator), next(iterator)
  state = iterator.get_state()
  rest = list(iterator)
  resumed = iter(_pipeline(_records(10), tokenizer, batch_size=3, num_epochs=2))
  resumed.set_state(state)
  resumed_rest = list(resumed)
  assert len(rest) == len(resumed_rest) == 5  # 20 examples: 7 batches, 2 taken
  for a, b in zip(rest, resumed_rest):
    assert a["id"] == b["id"]
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
      np.testing.assert_array_equal(a[key], b[key])


def _bad_records():
  good = _records(4)
  return good + [
      good[0].replace(id="corrupt", images=(_png()[:60],)),
      good[0].replace(id="empty_image", images=(b"",)),
      good[0].replace(id="no_answer", answer=" "),
      good[0].replace(id="too_wide", images=(_png(28, 28 * 201),)),
      good[0].replace(id="tiny", images=(_png(10, 10),)),
      good[0].replace(id="long", question="x" * 600),
  ]


def test_bad_records_are_counted_logged_and_skipped(tokenizer, caplog):
  pipeline = _pipeline(_bad_records(), tokenizer, max_pixels=28 * 28 * 300)
  with caplog.at_level(logging.WARNING, logger="dprl.data.pipeline"):
    ids = _all_ids(pipeline)
  assert sorted(ids) == ["r0", "r1", "r2", "r3"]
  assert pipeline.bad_records.counts == {
      ip.CORRUPT_IMAGE: 1, ip.MISSING_IMAGE: 1, pl.MISSING_ANSWER: 1,
      ip.IMAGE_OUT_OF_BOUNDS: 2, pl.PROMPT_TOO_LONG: 1}
  assert pipeline.bad_records.num_bad == 6
  for rid in ("corrupt", "empty_image", "no_answer", "too_wide", "tiny", "long"):
    assert f"'{rid}'" in caplog.text
    assert any(f"'{rid}'" in m for m in pipeline.bad_records.messages)
  assert "skipped 6 bad records" in pipeline.bad_records.summary()


@pytest.mark.parametrize("bad_id,match", [
    ("corrupt", "record 'corrupt' image 0: cannot decode"),
    ("no_answer", "record 'no_answer': field 'answer' is empty"),
    ("too_wide", "record 'too_wide' image 0: aspect ratio"),
])
def test_bad_record_is_fatal_when_configured(tokenizer, bad_id, match):
  records = [r for r in _bad_records() if r.id in ("r0", bad_id)]
  pipeline = _pipeline(records, tokenizer, on_bad_record="raise", shuffle=False,
                       max_pixels=28 * 28 * 300)
  with pytest.raises(BadRecordError, match=match):
    list(pipeline)


def test_template_missing_field_is_a_bad_record(tokenizer):
  records = _records(3)
  records[1] = records[1].replace(caption=None)
  pipeline = _pipeline(records, tokenizer, template={"names": "caption+format"})
  assert sorted(_all_ids(pipeline)) == ["r0", "r2"]
  assert pipeline.bad_records.counts == {templates.MISSING_FIELD: 1}


def test_question_spelling_an_image_pad_token_is_a_bad_record(tokenizer):
  records = _records(2)
  records[0] = records[0].replace(question="What is <|image_pad|>?")
  pipeline = _pipeline(records, tokenizer)
  assert _all_ids(pipeline) == ["r1"]
  assert pipeline.bad_records.counts == {pl.BAD_FIELD: 1}
  assert "record 'r0': field 'question'" in pipeline.bad_records.messages[0]


def test_text_only_batches_have_no_pixels(tokenizer):
  records = _records(4)
  records[0] = records[0].replace(images=(b"",))  # not shown, so not decoded
  batch = next(iter(_pipeline(records, tokenizer, template={"names": ("text_only",)})))
  assert batch["pixel_values"].shape == (0, 1176)
  assert batch["image_grid_thw"].shape == (0, 3)
  assert batch["num_images"].tolist() == [0, 0, 0, 0]
  image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
  assert not (batch["input_ids"] == image_pad).any()


def test_tfds_example_dicts_are_converted_and_bad_ones_counted(tokenizer):
  tfds_builder = pytest.importorskip("dprl.data.tfds_builder")
  records = _records(3)
  items = [tfds_builder.example_from_record(r) for r in records]
  items[1] = {k: v for k, v in items[1].items() if k != "answer"}
  pipeline = _pipeline(items, tokenizer, shuffle=False)
  batch = next(iter(pipeline))
  assert batch["id"] == ["r0", "r2"]
  assert batch["pass_rate"] == [records[0].pass_rate, records[2].pass_rate]
  assert pipeline.bad_records.counts == {pl.BAD_SOURCE_ITEM: 1}
  assert "source item 1" in pipeline.bad_records.messages[0]


def test_tfds_array_record_data_source_feeds_the_pipeline(tokenizer, tmp_path):
  tfds_builder = pytest.importorskip("dprl.data.tfds_builder")
  records = _records(5)
  builder = tfds_builder.RecordsBuilder(splits={"train": records}, config="pipeline_test",
                                        data_dir=str(tmp_path))
  builder.download_and_prepare()
  source = builder.as_data_source()["train"]
  pipeline = _pipeline(source, tokenizer, batch_size=5)
  batch = next(iter(pipeline))
  from_list = next(iter(_pipeline(records, tokenizer, batch_size=5)))
  assert batch["id"] == from_list["id"]
  np.testing.assert_array_equal(batch["input_ids"], from_list["input_ids"])
  np.testing.assert_array_equal(batch["pixel_values"], from_list["pixel_values"])
  assert pipeline.bad_records.num_bad == 0


def test_bucket_lengths():
  assert pl.bucket_lengths(300, min_bucket=32) == (32, 64, 128, 256, 300)
  assert pl.bucket_lengths(256, min_bucket=64) == (64, 128, 256)
  assert pl.padded_length(65, (32, 64, 128)) == 128
  assert pl.padded_length(64, (32, 64, 128)) == 64
  with pytest.raises(ValueError, match="below max_prompt_length"):
    pl.bucket_lengths(512, (128, 256))
  with pytest.raises(ValueError, match="ascending"):
    pl.bucket_lengths(256, (256, 128))


def test_custom_buckets_bound_the_padded_length(tokenizer):
  batches = list(_pipeline(_records(4), tokenizer, length_buckets=(300, 400, 512)))
  (batch,) = batches
  longest = batch["attention_mask"].sum(axis=1).max()
  assert 300 < longest <= 400  # ~350 characters of chat, instruction and question
  assert batch["input_ids"].shape[1] == 400


def test_config_rejects_unknown_bad_record_policy_and_short_buckets():
  with pytest.raises(ValueError, match="on_bad_record"):
    pl.PipelineConfig(on_bad_record="ignore")
  with pytest.raises(ValueError, match="below max_prompt_length"):
    pl.PipelineConfig(max_prompt_length=512, length_buckets=(128,))


def test_pipeline_does_not_import_torch(small_dir):
  code = f"""
import io, sys
import numpy as np
from PIL import Image
from dprl.data import pipeline as pl, tokenizer as t
from dprl.data.records import Record
buffer = io.BytesIO()
Image.new("RGB", (56, 56), "red").save(buffer, "PNG")
records = [Record(id="a", question="q", answer="1", images=(buffer.getvalue(),))]
tok = t.load_tokenizer({str(small_dir)!r})
batch = next(iter(pl.Pipeline(records, tok, pl.PipelineConfig(batch_size=1), process_index=0,
                              process_count=1)))
assert batch["pixel_values"].shape == (16, 1176), batch["pixel_values"].shape
assert "torch" not in sys.modules, "torch was imported"
"""
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
