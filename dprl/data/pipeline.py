"""The grain pipeline from random-access `Record`s to left-padded model-input batches.

    pipeline = Pipeline(records_or_tfds_source, tokenizer, PipelineConfig(batch_size=8))
    iterator = iter(pipeline)          # a grain DatasetIterator
    batch = next(iterator)
    state = iterator.get_state()       # save with the train state; set_state() resumes

Stages (grain `MapDataset` until the per-record work, then `IterDataset`):
  source      a list of Records, or a random-access source of dicts (a TFDS
              `as_data_source()` split) converted by `record_fn`;
  shuffle     seeded, global, reseeded each epoch;
  shard       host `process_index` of `process_count` (default: jax's) takes every
              process_count-th record of the shuffled order, after dropping the last
              `len % process_count` so all hosts see equally many;
  repeat      `num_epochs` times (None: forever);
  map         render the prompt with the configured template, tokenize, preprocess
              the images, expand each <|image_pad|> to its merged-patch count;
  batch       left-pad to the smallest length bucket that fits (powers of two by
              default), so jit sees few distinct shapes.

A bad record (undecodable, empty or out-of-bounds image; no answer; a field the template
needs; a prompt over `max_prompt_length`) is logged with its id and counted in
`Pipeline.bad_records`, then skipped; with `on_bad_record="raise"` it stops the pipeline
with a `BadRecordError` naming the record instead. Nothing is dropped silently.

Batch (B examples, T the bucket length):
  input_ids       [B, T] int32, left-padded with the tokenizer's pad id
  attention_mask  [B, T] int32, 0 on padding
  pixel_values    [sum_patches, 3*2*14*14] float32, images of the batch in order
  image_grid_thw  [num_images, 3] int32
  num_images      [B] int32, images per example (to split pixel_values by example)
  id, answer, source, level, pass_rate, prompt: lists of B Python values.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dprl.data import image_processing
from dprl.data import templates
from dprl.data import tokenizer as tokenizer_lib
from dprl.data.records import BadRecordError, Record

log = logging.getLogger(__name__)

# Bad-record reasons besides those of image_processing and templates.
MISSING_ANSWER = "missing_answer"
PROMPT_TOO_LONG = "prompt_too_long"
BAD_SOURCE_ITEM = "bad_source_item"
BAD_FIELD = "bad_field"

METADATA_KEYS = ("id", "answer", "source", "level", "pass_rate", "prompt")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How records become batches.

  Attributes:
    batch_size: examples per batch (per host).
    seed: shuffle seed; the same on every host, so shards are disjoint.
    shuffle: shuffle globally (reseeded each epoch) before sharding.
    num_epochs: passes over the data; None repeats forever (training).
    drop_remainder: drop a last batch smaller than batch_size.
    template: prompt templates (a TemplateConfig or its fields as a dict).
    min_pixels, max_pixels: resized image area bounds (defaults: Qwen2.5-VL's;
      the papers' EasyR1 recipes use 262144 and 4194304).
    min_image_side: images with a smaller side are bad records (None: 28 px).
    patch_size, temporal_patch_size, merge_size: the vision tower's.
    max_prompt_length: longer prompts (image tokens included) are bad records.
    length_buckets: allowed padded lengths, ascending; None means powers of two from
      `min_bucket` up to max_prompt_length, and max_prompt_length itself.
    min_bucket: smallest power-of-two bucket when length_buckets is None.
    on_bad_record: "skip" (log, count, skip) or "raise".
    num_threads, prefetch_buffer_size: grain ReadOptions for the per-record work.
  """

  batch_size: int = 8
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = 1
  drop_remainder: bool = False
  template: templates.TemplateConfig = dataclasses.field(
      default_factory=templates.TemplateConfig)
  min_pixels: int = image_processing.QWEN2_5_VL_MIN_PIXELS
  max_pixels: int = image_processing.QWEN2_5_VL_MAX_PIXELS
  min_image_side: int | None = None
  patch_size: int = image_processing.PATCH_SIZE
  temporal_patch_size: int = image_processing.TEMPORAL_PATCH_SIZE
  merge_size: int = image_processing.MERGE_SIZE
  max_prompt_length: int = 2048
  length_buckets: tuple[int, ...] | None = None
  min_bucket: int = 32
  on_bad_record: str = "skip"
  num_threads: int = 4
  prefetch_buffer_size: int = 32

  def __post_init__(self):
    if isinstance(self.template, Mapping):
      object.__setattr__(self, "template", templates.TemplateConfig(**self.template))
    if self.on_bad_record not in ("skip", "raise"):
      raise ValueError(f"on_bad_record must be 'skip' or 'raise', got {self.on_bad_record!r}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}")
    self.buckets  # pylint: disable=pointless-statement  # validates length_buckets

  @property
  def buckets(self) -> tuple[int, ...]:
    """The padded lengths batches may take (`length_buckets`, or the powers of two)."""
    return bucket_lengths(self.max_prompt_length, self.length_buckets, self.min_bucket)


def bucket_lengths(max_length: int, buckets: Sequence[int] | None = None,
                   min_bucket: int = 32) -> tuple[int, ...]:
  """The padded lengths allowed: `buckets` checked, or powers of two up to max_length."""
  if buckets is None:
    powers, length = [], max(1, min_bucket)
    while length < max_length:
      powers.append(length)
      length *= 2
    return tuple(powers) + (max_length,)
  buckets = tuple(int(b) for b in buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
    raise ValueError(f"length_buckets must be ascending positive lengths, got {buckets}")
  if buckets[-1] < max_length:
    raise ValueError(f"the largest length bucket {buckets[-1]} is below "
                     f"max_prompt_length {max_length}")
  return buckets


def padded_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length."""
  index = int(np.searchsorted(np.asarray(buckets), length, side="left"))
  if index == len(buckets):
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")
  return int(buckets[index])


def as_record(item: Record | Mapping[str, Any]) -> Record:
  """A Record as is; a dict (a TFDS example) through `tfds_builder.record_from_example`."""
  if isinstance(item, Record):
    return item
  if isinstance(item, Mapping):
    # Imported here: tensorflow_datasets is slow to import and lists of Records skip it.
    from dprl.data import tfds_builder  # pylint: disable=g-import-not-at-top
    return tfds_builder.record_from_example(item)
  raise TypeError(f"expected a Record or a dict of record fields, got {type(item).__name__}")


class BadRecordReport:
  """Counts and messages of skipped records, by reason; shared by the worker threads."""

  def __init__(self, max_messages: int = 100):
    self.counts: collections.Counter[str] = collections.Counter()
    self.messages: list[str] = []  # the first `max_messages`, "reason: message"
    self._max_messages = max_messages
    self._lock = threading.Lock()

  def add(self, reason: str, message: str) -> None:
    with self._lock:
      self.counts[reason] += 1
      if len(self.messages) < self._max_messages:
        self.messages.append(f"{reason}: {message}")

  @property
  def num_bad(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
    return f"skipped {self.num_bad} bad records ({reasons})"


class _Reject(BadRecordError):
  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


class RecordToExample:
  """One record -> one example: token ids, pixel values, grids and metadata.

  Called by grain's worker threads: it only reads shared state, and tokenizes through
  the `tokenizers` backend, whose encode does not mutate the tokenizer (the transformers
  wrapper resets truncation/padding on every call, which races across threads).
  """

  def __init__(self, tokenizer, config: PipelineConfig, report: BadRecordReport,
               record_fn: Callable[[Any], Record] = as_record, num_source_items: int = 0):
    self._tokenizer = tokenizer
    self._config = config
    self._report = report
    self._record_fn = record_fn
    self._num_source_items = num_source_items
    self._image_pad_id = tokenizer_lib.SpecialTokenIds.from_tokenizer(tokenizer).image_pad

  def __call__(self, index: int, item: Any) -> dict[str, Any] | None:
    source_index = index % self._num_source_items if self._num_source_items else index
    record_id = None
    try:
      try:
        record = self._record_fn(item)
      except BadRecordError:
        raise
      except Exception as e:  # any conversion failure is this item's fault
        raise _Reject(f"source item {source_index}: cannot make a Record: "
                      f"{type(e).__name__}: {e}", BAD_SOURCE_ITEM) from e
      record_id = record.id
      return self.example(record)
    except BadRecordError as e:
      if self._config.on_bad_record == "raise":
        raise
      reason = getattr(e, "reason", "bad_record")
      message = str(e) if record_id is None or repr(record_id) in str(e) else (
          f"record {record_id!r}: {e}")
      self._report.add(reason, message)
      log.warning("skipping bad record (%s): %s", reason, message)
      return None

  def example(self, record: Record) -> dict[str, Any]:
    config = self._config
    if not record.answer or not record.answer.strip():
      raise _Reject(f"record {record.id!r}: field 'answer' is empty", MISSING_ANSWER)
    prompt = templates.build_prompt(record, config.template)
    prompt_text = self._tokenizer.apply_chat_template(
        templates.prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    if prompt.num_images:
      pixel_values, grid_thw = image_processing.preprocess_images(
          record.images, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
          patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
          merge_size=config.merge_size, min_side=config.min_image_side,
          record_id=record.id)
    else:  # e.g. text_only: the record's images are not shown, so not decoded either
      patch_dim = 3 * config.temporal_patch_size * config.patch_size ** 2
      pixel_values = np.zeros((0, patch_dim), np.float32)
      grid_thw = np.zeros((0, 3), np.int64)
    token_ids = self._tokenizer.backend_tokenizer.encode(
        prompt_text, add_special_tokens=False).ids
    try:
      input_ids = templates.expand_image_tokens(token_ids, grid_thw, self._image_pad_id,
                                                config.merge_size)
    except ValueError as e:  # a question that itself spells <|image_pad|>
      raise _Reject(f"record {record.id!r}: field 'question': {e}", BAD_FIELD) from e
    if len(input_ids) > config.max_prompt_length:
      raise _Reject(f"record {record.id!r}: prompt has {len(input_ids)} tokens (images "
                    f"included), above max_prompt_length {config.max_prompt_length}",
                    PROMPT_TOO_LONG)
    return {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw,
        "id": record.id,
        "answer": record.answer,
        "source": record.source,
        "level": record.level,
        "pass_rate": record.pass_rate,
        "prompt": prompt_text,
    }


def collate(examples: Sequence[dict[str, Any]], *, pad_id: int,
            buckets: Sequence[int], patch_dim: int) -> dict[str, Any]:
  """Left-pads examples into one batch (see the module docstring for the layout)."""
  lengths = [len(example["input_ids"]) for example in examples]
  length = padded_length(max(lengths), buckets)
  input_ids = np.full((len(examples), length), pad_id, np.int32)
  attention_mask = np.zeros((len(examples), length), np.int32)
  for row, (example, n) in enumerate(zip(examples, lengths)):
    # Left padding: every prompt ends at the last column, where decoding continues.
    input_ids[row, length - n:] = example["input_ids"]
    attention_mask[row, length - n:] = 1
  pixel_values = [example["pixel_values"] for example in examples]
  grids = [example["image_grid_thw"] for example in examples]
  batch = {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "pixel_values": (np.concatenate(pixel_values, axis=0).astype(np.float32, copy=False)
                       if pixel_values else np.zeros((0, patch_dim), np.float32)),
      "image_grid_thw": np.concatenate(grids, axis=0).astype(np.int32).reshape(-1, 3),
      "num_images": np.asarray([len(g) for g in grids], np.int32),
  }
  for key in METADATA_KEYS:
    batch[key] = [example[key] for example in examples]
  return batch


class Pipeline:
  """A grain pipeline over one host's shard; iterate it for a checkpointable iterator.

  Attributes:
    dataset: the `grain.IterDataset` of batches.
    bad_records: what was skipped, by reason (updated as records are processed,
      including records read ahead by the prefetch threads).
  """

  def __init__(self, source: Sequence[Any], tokenizer, config: PipelineConfig | None = None,
               *, process_index: int | None = None, process_count: int | None = None,
               record_fn: Callable[[Any], Record] = as_record):
    """Args:
      source: random access (`len`, `[i]`) to Records or to dicts `record_fn` converts.
      tokenizer: a transformers fast tokenizer with the Qwen2.5-VL chat template and
        special-token strings (`dprl.data.tokenizer.load_tokenizer`).
      config: see `PipelineConfig`.
      process_index, process_count: this host's shard; default jax.process_index() and
        jax.process_count().
      record_fn: item -> Record; the default takes Records and TFDS example dicts.
    """
    config = PipelineConfig() if config is None else config
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top  # only when not told the shard
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.config = config
    self.bad_records = BadRecordReport()
    self.special_ids = tokenizer_lib.SpecialTokenIds.from_tokenizer(tokenizer)

    num_items = len(source)
    dataset = grain.MapDataset.source(source)
    # Tag items with their position so an unconvertible item can still be named.
    dataset = dataset.map_with_index(lambda index, item: (index, item))
    if config.shuffle:
      dataset = dataset.shuffle(seed=config.seed)
    per_host = num_items // process_count
    dataset = dataset[:per_host * process_count][process_index::process_count]
    if config.num_epochs != 1:
      dataset = dataset.repeat(config.num_epochs)
    to_example = RecordToExample(tokenizer, config, self.bad_records, record_fn, num_items)
    dataset = dataset.map(lambda tagged: to_example(*tagged))
    patch_dim = 3 * config.temporal_patch_size * config.patch_size ** 2
    self.dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=config.num_threads,
        prefetch_buffer_size=config.prefetch_buffer_size)).batch(
            config.batch_size, drop_remainder=config.drop_remainder,
            batch_fn=lambda examples: collate(
                examples, pad_id=self.special_ids.pad, buckets=config.buckets,
                patch_dim=patch_dim))

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)
