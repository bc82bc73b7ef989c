"""Readers: each layout from fixtures written here, bad records, the JSONL round trip."""

from __future__ import annotations

import io
import json
import logging

import hypothesis
import hypothesis.strategies as st
import pytest
from PIL import Image

from dprl.data import readers
from dprl.data.records import BadRecordError, Record


def _png(color="red", size=(28, 28)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, "PNG")
  return buffer.getvalue()


def _jpeg(color="blue") -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (56, 28), color).save(buffer, "JPEG")
  return buffer.getvalue()


def _write_jsonl(path, rows):
  lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.fixture
def image_dir(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  (images / "a.png").write_bytes(_png("red"))
  (images / "b.jpg").write_bytes(_jpeg("blue"))
  (images / "truncated.png").write_bytes(_png("green")[:40])
  (images / "not_an_image.png").write_bytes(b"hello")
  return images


def test_geometry3k_reads_images_as_bytes_and_strips_placeholders(tmp_path, image_dir):
  path = _write_jsonl(tmp_path / "geo.jsonl", [
      {"images": ["images/a.png"], "problem": "<image>Find x.", "answer": "3"},
      {"images": ["images/a.png", "images/b.jpg"], "problem": "<image><image>Which is larger?",
       "answer": 2.5, "subject": "geometry"},
  ])
  records = readers.read_records(path, layout="geometry3k")
  assert [r.question for r in records] == ["Find x.", "Which is larger?"]
  assert [r.answer for r in records] == ["3", "2.5"]
  assert records[0].images == ((image_dir / "a.png").read_bytes(),)
  assert records[1].images[1] == (image_dir / "b.jpg").read_bytes()
  assert records[0].id == "geo-1" and records[0].source == "geometry3k"
  assert records[1].metadata == {"subject": "geometry"}


def test_k12_alias_sets_its_source_and_image_root_is_honoured(tmp_path, image_dir):
  data = tmp_path / "elsewhere"
  data.mkdir()
  path = _write_jsonl(data / "k12.jsonl", [
      {"id": "k1", "images": ["a.png"], "problem": "<image>What is 1+1?", "answer": "2"}])
  (record,) = readers.read_records(path, layout="k12", image_root=image_dir)
  assert record.source == "k12" and record.id == "k1"


def test_mm_eureka_message_as_json_string_and_as_list(tmp_path, image_dir):
  message = [
      {"role": "system", "content": "Think step by step."},
      {"role": "user", "content": [{"type": "image", "image": "file://images/a.png"},
                                   {"type": "text", "text": "How many sides?"}]},
  ]
  path = _write_jsonl(tmp_path / "eureka.jsonl", [
      {"id": "e1", "message": json.dumps(message), "answer": "4", "image": ["images/a.png"]},
      {"id": "e2", "conversations": [{"role": "user", "content": "<image>\nWhat colour?"}],
       "answer": "blue", "image_urls": ["images/b.jpg"]},
  ])
  first, second = readers.read_records(path, layout="mm_eureka")
  assert first.question == "How many sides?" and first.answer == "4"
  assert first.images == ((image_dir / "a.png").read_bytes(),)
  assert first.metadata["system_prompt"] == "Think step by step."
  assert second.question == "What colour?"
  assert second.images == ((image_dir / "b.jpg").read_bytes(),)


def test_mathvista_multi_choice_answer_becomes_letter(tmp_path, image_dir):
  # MathVista ships testmini.json as a dict keyed by pid.
  path = tmp_path / "testmini.json"
  path.write_text(json.dumps({
      "1": {"pid": "1", "question": "Which is red?", "image": "images/a.png",
            "choices": ["blue", "red"], "answer": "red", "question_type": "multi_choice",
            "answer_type": "text", "query": "Hint: ...", "precision": None, "unit": None},
      "2": {"pid": "2", "question": "What is x?", "image": "images/b.jpg", "choices": None,
            "answer": "1.5", "question_type": "free_form", "answer_type": "float",
            "precision": 1.0},
  }))
  first, second = readers.read_records(path, layout="mathvista")
  assert first.choices == ("blue", "red") and first.answer == "B"
  assert first.metadata["answer_text"] == "red" and first.metadata["query"] == "Hint: ..."
  assert second.choices is None and second.answer == "1.5"
  assert second.metadata["answer_type"] == "float"


def test_mathverse_text_only_has_no_image_and_vision_only_gets_a_question(tmp_path, image_dir):
  path = _write_jsonl(tmp_path / "mathverse.jsonl", [
      {"sample_index": "1", "problem_index": "1", "problem_version": "Text Only",
       "question": "A triangle has angles 30 and 60. Find the third.", "image": "",
       "answer": "90", "question_type": "free-form", "query_wo": "q", "query_cot": "q"},
      {"sample_index": "2", "problem_index": "1", "problem_version": "Vision Only",
       "question": "", "image": "images/a.png", "answer": "B",
       "question_type": "multi-choice", "query_wo": "q", "query_cot": "q"},
  ])
  text_only, vision_only = readers.read_records(path, layout="mathverse")
  assert text_only.images == () and text_only.answer == "90"
  assert vision_only.question == readers.MATHVERSE_VISION_ONLY_QUESTION
  assert vision_only.metadata["problem_version"] == "Vision Only"
  assert len(vision_only.images) == 1


def _bad_file(tmp_path):
  return _write_jsonl(tmp_path / "bad.jsonl", [
      {"id": "ok", "images": ["images/a.png"], "problem": "<image>Fine.", "answer": "1"},
      '{"id": "broken", "problem": ',  # malformed JSON, line 2
      {"id": "noanswer", "images": ["images/a.png"], "problem": "<image>Q"},
      {"id": "missing", "images": ["images/nope.png"], "problem": "<image>Q", "answer": "1"},
      {"id": "trunc", "images": ["images/truncated.png"], "problem": "<image>Q", "answer": "1"},
      {"id": "junk", "images": ["images/not_an_image.png"], "problem": "<image>Q", "answer": "1"},
      {"id": "ok", "images": ["images/a.png"], "problem": "<image>Again.", "answer": "1"},
      {"id": "twoimg", "images": ["images/a.png"], "problem": "<image><image>Q", "answer": "1"},
  ])


def test_bad_records_are_skipped_counted_and_logged(tmp_path, image_dir, caplog):
  report = readers.ReadReport()
  with caplog.at_level(logging.WARNING, logger="dprl.data.readers"):
    records = readers.read_records(_bad_file(tmp_path), report=report)
  assert [r.id for r in records] == ["ok"]
  assert report.num_read == 1
  assert dict(report.skipped) == {
      readers.MALFORMED_JSON: 1, readers.MISSING_FIELD: 1, readers.MISSING_IMAGE: 1,
      readers.CORRUPT_IMAGE: 2, readers.DUPLICATE_ID: 1, readers.BAD_FIELD: 1}
  assert any("bad.jsonl:3: record 'noanswer': field 'answer'" in m for m in caplog.messages)
  assert any("bad.jsonl:2" in p and "malformed_json" in p for p in report.problems)
  assert "skipped 7" in caplog.messages[-1]


@pytest.mark.parametrize("line, id_, field", [
    (2, "?", "<line>"), (3, "noanswer", "answer"), (4, "missing", "images[0]"),
    (5, "trunc", "images[0]")])
def test_strict_mode_names_file_line_id_and_field(tmp_path, image_dir, line, id_, field):
  path = _bad_file(tmp_path)
  rows = path.read_text().splitlines()
  # Keep only the good first line and the bad line under test, at its original number.
  path.write_text("\n".join(r if i in (0, line - 1) else "" for i, r in enumerate(rows)))
  with pytest.raises(BadRecordError) as error:
    readers.read_records(path, strict=True)
  message = str(error.value)
  assert f"bad.jsonl:{line}:" in message
  assert f"record {id_!r}" in message and f"field {field!r}" in message


def test_unknown_layout_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown layout 'nope'"):
    readers.read_records(tmp_path / "x.jsonl", layout="nope")


def test_iter_records_is_lazy(tmp_path, image_dir):
  path = _write_jsonl(tmp_path / "geo.jsonl", [
      {"images": ["images/a.png"], "problem": "<image>Q1", "answer": "1"},
      {"images": ["images/nope.png"], "problem": "<image>Q2", "answer": "1"}])
  iterator = readers.iter_records(path, strict=True)
  assert next(iterator).question == "Q1"  # the bad second line is not read yet
  with pytest.raises(BadRecordError):
    next(iterator)


def test_write_then_read_round_trips_every_field_byte_exact(tmp_path):
  records = [
      Record(id="a/1", question="How many?", answer="3", images=(_png(), _jpeg()),
             choices=("1", "3"), caption="three dots", text_question="3 dots. How many?",
             source="synthetic", level=4, pass_rate=1 / 3,
             metadata={"task": "count", "nested": {"k": [1, 2.5, None]}}),
      Record(id="b", question="Text only", answer="x"),
      Record(id="c", question="Same image again", answer="y", images=(_png(),)),
  ]
  path = readers.write_jsonl(records, tmp_path / "out" / "subset.jsonl")
  assert len(list((tmp_path / "out" / "subset_images").iterdir())) == 2  # deduplicated
  assert readers.read_records(path, layout="dprl", strict=True) == records


def test_writer_rejects_non_json_metadata_naming_the_record(tmp_path):
  record = Record(id="r", question="q", answer="a", metadata={"x": object()})
  with pytest.raises(BadRecordError, match="record 'r': field 'metadata'"):
    readers.write_jsonl([record], tmp_path / "x.jsonl")


_IMAGE_POOL = (_png("red"), _jpeg("blue"), _png("white", (56, 56)))
_text = st.text(max_size=20)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | _text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8)


@hypothesis.settings(max_examples=40, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(st.lists(st.builds(
    Record, id=st.text(min_size=1, max_size=10), question=_text, answer=_text,
    images=st.lists(st.sampled_from(_IMAGE_POOL), max_size=3).map(tuple),
    choices=st.none() | st.lists(_text, max_size=3).map(tuple),
    caption=st.none() | _text, text_question=st.none() | _text, source=_text,
    level=st.none() | st.integers(-5, 2**40), pass_rate=st.none() | st.floats(0.0, 1.0),
    metadata=st.dictionaries(_text, _json, max_size=3)),
    max_size=4, unique_by=lambda r: r.id))
def test_any_records_survive_the_jsonl_round_trip(tmp_path, records):
  path = readers.write_jsonl(records, tmp_path / "any.jsonl")
  assert readers.read_records(path, layout="dprl", strict=True) == records
