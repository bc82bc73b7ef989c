"""TFDS builders: array_record round trips, grain random access, no TensorFlow needed."""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import grain
import hypothesis
import hypothesis.strategies as st
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dprl.data import readers, synthetic
from dprl.data import tfds_builder as tb
from dprl.data.records import BadRecordError, Record


def _image(fmt: str, color: str, size=(28, 56)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, fmt)
  return buffer.getvalue()


def _records() -> list[Record]:
  return [
      Record(id="curated-1", question="Find x. ∠A = 30°", answer="\\frac{1}{3}",
             images=(_image("PNG", "red"), _image("JPEG", "blue", (56, 28))),
             choices=("1", "\\frac{1}{3}"), caption="a triangle", text_question="A triangle.",
             source="geometry3k", level=3, pass_rate=1 / 3,
             metadata={"subject": "geometry", "rollouts": [0, 1, 0], "nested": {"a": None}}),
      Record(id="text-only", question="1+1?", answer="2", level=0, pass_rate=0.0),
      Record(id="plain", question="q", answer="a", images=(_image("PNG", "green"),)),
  ]


def _build(tmp_path, splits, config="subset", **kwargs):
  builder = tb.RecordsBuilder(splits=splits, config=config, data_dir=tmp_path, **kwargs)
  builder.download_and_prepare()
  return builder


def test_records_round_trip_exactly_with_byte_equal_images_in_order(tmp_path):
  records = _records()
  source = _build(tmp_path, {"train": records}).as_data_source()["train"]
  assert len(source) == 3
  assert [tb.record_from_example(source[i]) for i in range(3)] == records
  # The stored image is the original encoded file, not a re-encoding of its pixels.
  assert source[0]["images"][1] == records[0].images[1]


def test_tfds_data_source_and_load_data_source_read_the_build(tmp_path):
  records = _records()
  _build(tmp_path, {"train": records[:2], "test": records[2:]})
  by_name = tfds.data_source("dprl_records/subset", data_dir=tmp_path)
  from_files = tb.load_data_source(tmp_path, config="subset")
  for sources in (by_name, from_files):
    assert {k: len(v) for k, v in sources.items()} == {"train": 2, "test": 1}
    assert tb.record_from_example(sources["test"][0]) == records[2]


def test_grain_map_dataset_over_the_source(tmp_path):
  records = _records()
  source = _build(tmp_path, {"train": records}).as_data_source()["train"]
  dataset = grain.MapDataset.source(source).shuffle(seed=0).map(tb.record_from_example)
  assert len(dataset) == 3
  assert sorted(dataset, key=lambda r: r.id) == sorted(records, key=lambda r: r.id)
  assert dataset[1] == dataset[1]  # random access is deterministic


def test_builds_from_a_jsonl_file_in_a_reader_layout(tmp_path):
  (tmp_path / "a.png").write_bytes(_image("PNG", "red"))
  rows = [{"images": ["a.png"], "problem": "<image>Find x.", "answer": "3", "id": "g1"}]
  (tmp_path / "geo.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  source = _build(tmp_path / "tfds", {"train": tmp_path / "geo.jsonl"},
                  layout="geometry3k").as_data_source()["train"]
  expected = readers.read_records(tmp_path / "geo.jsonl", layout="geometry3k")
  assert [tb.record_from_example(source[0])] == expected


def test_a_bad_record_in_a_jsonl_split_fails_the_build_by_default(tmp_path):
  (tmp_path / "geo.jsonl").write_text(json.dumps({"problem": "Q", "id": "noanswer"}) + "\n")
  with pytest.raises(BadRecordError, match="geo.jsonl:1: record 'noanswer': field 'answer'"):
    _build(tmp_path / "tfds", {"train": tmp_path / "geo.jsonl"}, layout="geometry3k")


@pytest.mark.parametrize("change, field", [
    (dict(caption=""), "caption"), (dict(choices=()), "choices"), (dict(level=-1), "level"),
    (dict(pass_rate=1.5), "pass_rate"), (dict(metadata={"x": b"bytes"}), "metadata")])
def test_values_the_format_cannot_store_unambiguously_are_rejected(change, field):
  record = Record(id="r", question="q", answer="a").replace(**change)
  with pytest.raises(BadRecordError, match=f"record 'r': field '{field}'"):
    tb.example_from_record(record)


def test_duplicate_ids_fail_the_build(tmp_path):
  record = Record(id="same", question="q", answer="a")
  with pytest.raises(BadRecordError, match="'same': field 'id': duplicate"):
    _build(tmp_path, {"train": [record, record]})


def test_synthetic_builder_matches_generate_split(tmp_path):
  config = tb.SyntheticConfig(name="small", tasks=("count_color", "bar_tallest"),
                              num_train=12, num_test=6, seed=4)
  builder = tb.SyntheticBuilder(config=config, data_dir=tmp_path)
  builder.download_and_prepare()
  sources = builder.as_data_source()
  for split, num in (("train", 12), ("test", 6)):
    expected = synthetic.generate_split(["count_color", "bar_tallest"], split, num, seed=4)
    assert [tb.record_from_example(e) for e in sources[split]] == expected


def test_synthetic_tiny_preset_through_tfds_data_source(tmp_path):
  tb.SyntheticBuilder(config="tiny", data_dir=tmp_path).download_and_prepare()
  sources = tfds.data_source("dprl_synthetic/tiny", data_dir=tmp_path)
  assert {k: len(v) for k, v in sources.items()} == {"train": 2000, "test": 500}
  record = tb.record_from_example(sources["test"][7])
  assert record.metadata["task"] == "count_color" and record.source == "synthetic"


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow is installed, so its absence cannot be checked")
def test_building_and_reading_never_import_tensorflow(tmp_path):
  source = _build(tmp_path, {"train": _records()}).as_data_source()["train"]
  tb.record_from_example(source[0])
  assert "tensorflow" not in sys.modules


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=8)
_optional_text = st.none() | st.text(min_size=1, max_size=20)

records_strategy = st.builds(
    Record, id=st.text(min_size=1, max_size=10), question=st.text(max_size=30),
    answer=st.text(max_size=10), images=st.lists(st.binary(max_size=16), max_size=3).map(tuple),
    choices=st.none() | st.lists(st.text(max_size=5), min_size=1, max_size=4).map(tuple),
    caption=_optional_text, text_question=_optional_text, source=st.text(max_size=10),
    level=st.none() | st.integers(0, 2**40), pass_rate=st.none() | st.floats(0.0, 1.0),
    metadata=st.dictionaries(st.text(max_size=5), _json, max_size=4))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(records_strategy)
def test_any_record_survives_serialisation_through_the_features(record):
  serialized = tb.FEATURES.serialize_example(tb.example_from_record(record))
  assert tb.record_from_example(tb.FEATURES.deserialize_example_np(serialized)) == record
