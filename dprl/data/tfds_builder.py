"""TFDS builders that write `Record`s to array_record, for random access from grain.

Two builders share one feature spec (`FEATURES`):
  `dprl_records`    local data: lists of Records, or JSONL (+ images) in any reader layout.
  `dprl_synthetic`  the synthetic benchmark (`dprl.data.synthetic`), one config a preset.

Both write `file_format="array_record"`, the format that needs no TensorFlow: building
(`download_and_prepare`), reading (`as_data_source()`, `tfds.data_source(...)`) and
decoding to NumPy all work with only `tensorflow-datasets` and `array-record` installed.
What does need TensorFlow, and is not used here: `as_dataset()` / `tfds.load()`
(tf.data pipelines) and the default tfrecord file format.

Examples are flat dicts of NumPy/bytes values; `record_from_example` turns one back into
the `Record` it came from, exactly: images are stored as the encoded bytes they were
read as (byte-equal, not re-encoded), `pass_rate` as raw float64 bytes (a plain float
feature would round it to float32), and optional fields use sentinels that no valid
record holds (see `FEATURES`).

Usage:
  builder = RecordsBuilder(splits={"train": records}, config="stage1", data_dir=d)
  builder.download_and_prepare()
  source = builder.as_data_source()["train"]      # or load_data_source(d, ...)
  dataset = grain.MapDataset.source(source).map(record_from_example)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from dprl.data import readers
from dprl.data import synthetic
from dprl.data.records import BadRecordError, Record

# Sentinels for None, chosen so that no valid record can hold them.
NO_LEVEL = -1  # levels are counts of objects, steps, ...: never negative
NO_PASS_RATE = math.nan  # a pass rate is a fraction in [0, 1]

FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "question": tfds.features.Text(),
    "answer": tfds.features.Text(),
    # Encoded PNG/JPEG bytes as read. Not `tfds.features.Image`: that decodes to arrays
    # (which must share one shape in a sequence) and would re-encode what it is given.
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    "choices": tfds.features.Sequence(tfds.features.Text()),  # empty: None
    "caption": tfds.features.Text(),  # "": None
    "text_question": tfds.features.Text(),  # "": None
    "source": tfds.features.Text(),
    "level": tfds.features.Scalar(dtype=np.int64),  # NO_LEVEL: None
    "pass_rate": tfds.features.Tensor(shape=(), dtype=np.float64,
                                      encoding=tfds.features.Encoding.BYTES),  # NaN: None
    "metadata": tfds.features.Text(),  # JSON
})


def example_from_record(record: Record) -> dict[str, Any]:
  """The feature dict for `record`; raises for values the sentinels would make ambiguous."""

  def bad(field: str, why: str) -> BadRecordError:
    return BadRecordError(f"record {record.id!r}: field {field!r}: {why}")

  for field in ("caption", "text_question"):
    if getattr(record, field) == "":
      raise bad(field, "empty string; use None for 'no value'")
  if record.choices == ():
    raise bad("choices", "empty tuple; use None for 'not multiple choice'")
  if record.level is not None and record.level < 0:
    raise bad("level", f"must be >= 0, got {record.level}")
  if record.pass_rate is not None and not 0.0 <= record.pass_rate <= 1.0:
    raise bad("pass_rate", f"must be in [0, 1], got {record.pass_rate}")
  try:
    metadata = json.dumps(record.metadata, sort_keys=True, ensure_ascii=False)
  except TypeError as e:
    raise bad("metadata", f"not JSON: {e}") from None
  return {
      "id": record.id,
      "question": record.question,
      "answer": record.answer,
      "images": list(record.images),
      "choices": list(record.choices or ()),
      "caption": record.caption or "",
      "text_question": record.text_question or "",
      "source": record.source,
      "level": NO_LEVEL if record.level is None else record.level,
      "pass_rate": NO_PASS_RATE if record.pass_rate is None else float(record.pass_rate),
      "metadata": metadata,
  }


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_from_example(example: Mapping[str, Any]) -> Record:
  """The `Record` a decoded example (from `as_data_source()` or grain) was built from."""
  choices = tuple(_text(c) for c in example["choices"])
  caption, text_question = _text(example["caption"]), _text(example["text_question"])
  level, pass_rate = int(example["level"]), float(example["pass_rate"])
  return Record(
      id=_text(example["id"]),
      question=_text(example["question"]),
      answer=_text(example["answer"]),
      images=tuple(bytes(image) for image in example["images"]),
      choices=choices or None,
      caption=caption or None,
      text_question=text_question or None,
      source=_text(example["source"]),
      level=None if level == NO_LEVEL else level,
      pass_rate=None if math.isnan(pass_rate) else pass_rate,
      metadata=json.loads(_text(example["metadata"])),
  )


class _RecordBuilderBase(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared spec; subclasses say where each split's records come from."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  # No checksum or metadata files live beside this module. Saying so up front also
  # skips tfds' lookup of them, which imports the `importlib_resources` backport that
  # tensorflow-datasets 4.9.10 uses but does not declare (ModuleNotFoundError here).
  code_path = None

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` wants metadata files beside the class.
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=FEATURES,
        # Keys are record positions, so the files keep the records' order.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {name: self._generate_examples(name) for name in self._split_names()}

  def _generate_examples(self, split: str):
    seen: dict[str, int] = {}
    for index, record in enumerate(self._records(split)):
      if record.id in seen:
        raise BadRecordError(f"split {split!r}: record {record.id!r}: field 'id': "
                             f"duplicate of record {seen[record.id]}")
      seen[record.id] = index
      yield index, example_from_record(record)

  def _split_names(self) -> Sequence[str]:
    raise NotImplementedError

  def _records(self, split: str):
    raise NotImplementedError


class RecordsBuilder(_RecordBuilderBase):
  """Local records (curated subsets, JSONL datasets) as a random-access TFDS dataset.

  Each dataset is a config of `dprl_records`, named by you, so several live side by
  side under one `data_dir` (`<data_dir>/dprl_records/<config>/1.0.0/`).
  """

  name = "dprl_records"

  def __init__(self, *, splits: Mapping[str, Sequence[Record] | str | os.PathLike] | None = None,
               layout: str = "dprl", image_root: str | os.PathLike | None = None,
               strict: bool = True, config: str | tfds.core.BuilderConfig = "default",
               **kwargs):
    """Args:
      splits: split name -> Records, or a JSONL/JSON file read with `layout`. Needed only
        to build; reading an existing build needs just `config` and `data_dir`.
      layout, image_root, strict: passed to `readers.iter_records` for file splits.
        `strict` defaults to True: a dataset being frozen should not lose records
        quietly (with False, skips are logged and counted as in the readers).
      config: the dataset's name under `dprl_records`.
    """
    if isinstance(config, str):
      config = tfds.core.BuilderConfig(name=config)
    self._splits = dict(splits or {})
    self._layout, self._image_root, self._strict = layout, image_root, strict
    super().__init__(config=config, **kwargs)

  def _split_names(self):
    if not self._splits:
      raise ValueError(f"{self.name}/{self.builder_config.name}: pass `splits` to build")
    return list(self._splits)

  def _records(self, split):
    source = self._splits[split]
    if isinstance(source, (str, os.PathLike)):
      return readers.iter_records(source, self._layout, self._image_root, self._strict)
    return source


@dataclasses.dataclass(eq=False)  # tfds.core.BuilderConfig is a plain dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """Arguments of `synthetic.generate_split` for both splits."""

  tasks: tuple[str, ...] = ("count_color",)
  num_train: int = 2000
  num_test: int = 500
  seed: int = 0
  image_size: int = 56
  language_prior_fraction: float = 0.15


class SyntheticBuilder(_RecordBuilderBase):
  """The synthetic benchmark: `tiny` is the 2-core CPU demo's setting, `mixed` has all tasks."""

  name = "dprl_synthetic"
  BUILDER_CONFIGS = [
      SyntheticConfig(name="tiny", description="count_color, 56x56 images"),
      SyntheticConfig(name="mixed", tasks=tuple(sorted(synthetic.TASKS)), num_train=5000,
                      num_test=1000, description="every task family, 56x56 images"),
  ]

  def _split_names(self):
    return ["train", "test"]

  def _records(self, split):
    c = self.builder_config
    num = c.num_train if split == "train" else c.num_test
    return synthetic.generate_split(list(c.tasks), split, num, c.seed, image_size=c.image_size,
                                    language_prior_fraction=c.language_prior_fraction)


def load_data_source(data_dir: str | os.PathLike, name: str = "dprl_records",
                     config: str = "default", version: str = "1.0.0"):
  """The built splits under `data_dir` as random-access sources, from the files alone.

  Same as `tfds.data_source(f"{name}/{config}", data_dir=data_dir)`, but reads the
  files' own DatasetInfo instead of looking the builder class up, so a process that
  never imported this module (a grain worker, a notebook) can still open the data.
  """
  path = os.path.join(os.fspath(data_dir), name, config, version)
  return tfds.builder_from_directory(path).as_data_source()
