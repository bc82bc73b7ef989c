"""Sample K responses per record and score them: the engine behind evaluation, offline
difficulty curation (pass rates) and RAP selection (causal discrepancy).

    results = rollout_records(model, tokenizer, records, num_samples=8, max_new_tokens=512,
                              batch_size=16, seed=0)
    results[0].pass_rate            # fraction of the 8 responses that were correct

Records become prompts exactly as in training: the pipeline's per-record step
(`dprl.data.pipeline.RecordToExample`: template, chat template, image preprocessing,
image-token expansion) and its `collate` (left padding to a length bucket). Responses are
decoded without special tokens (so `<|im_end|>` goes and `<think>` stays) and scored by
`dprl.rl.rewards.score_responses`; their sampled token ids are kept beside the text
(`ItemResult.response_token_ids`), for teacher-forcing exactly what was sampled.

Determinism and resumption. Records are cut into fixed chunks of `batch_size` in the
order given, and chunk i samples with `fold_in(key(seed), i)`; a chunk short of
`batch_size` good records is padded with copies of its last example, so every chunk has
the same number of rows. A response therefore depends only on (seed, the records of its
chunk, its position), not on what was run before: a run resumed from a results file
(`resume_from`) reruns each chunk that still has unscored records whole and returns the
same results as an uninterrupted run. Write the file as results arrive with
`on_result=ResultWriter(path)`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tqdm

from dprl import resumable
from dprl.data import image_processing
from dprl.data import pipeline as pipeline_lib
from dprl.data import templates
from dprl.data import tokenizer as tokenizer_lib
from dprl.data.records import Record
from dprl.models.config import ModelConfig, get_preset
from dprl.rl import rewards as rewards_lib
from dprl.sampling import generate

log = logging.getLogger(__name__)

# Token strings that end a response: Qwen2.5-VL's turn end and its document end.
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclasses.dataclass
class ItemResult:
  """The K scored responses to one record.

  Attributes:
    id, source, level, answer: copied from the record.
    responses: K decoded responses (special tokens removed, `<think>` kept).
    correct: K booleans, whether each final answer matched `answer`.
    rewards: K rewards of the configured reward function.
    response_lengths: K generated-token counts, the end-of-turn token included.
    response_token_ids: K lists of the sampled ids, response_lengths[k] each (the end
      token included when the response stopped on one): what teacher-forcing must feed
      back (RAP's ACE), since encoding the decoded text again may segment it otherwise
      and loses special tokens. None for results read from files written before the
      ids were kept.
  """

  id: str
  source: str
  level: int | None
  answer: str
  responses: list[str]
  correct: list[bool]
  rewards: list[float]
  response_lengths: list[int]
  response_token_ids: list[list[int]] | None = None

  @property
  def num_samples(self) -> int:
    return len(self.responses)

  @property
  def num_correct(self) -> int:
    return int(sum(self.correct))

  @property
  def pass_rate(self) -> float:
    """The fraction of correct responses (the item's empirical difficulty prior)."""
    return self.num_correct / self.num_samples if self.num_samples else 0.0

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: Mapping[str, Any], where: str = "<json>") -> ItemResult:
    """Parses `to_json`'s dict; `where` (e.g. "file:line") names the source in errors."""
    optional = {"response_token_ids"}  # absent from files written before it was kept
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in optional]
    missing = [name for name in fields if name not in obj]
    if missing:
      raise ValueError(f"{where}: result is missing field(s) {missing}")
    lists = ("responses", "correct", "rewards", "response_lengths")
    sizes = {name: len(obj[name]) for name in lists}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"{where}: result {obj['id']!r} has lists of unequal lengths {sizes}")
    token_ids = obj.get("response_token_ids")
    if token_ids is not None:
      token_ids = [[int(t) for t in ids] for ids in token_ids]
      if [len(ids) for ids in token_ids] != [int(n) for n in obj["response_lengths"]]:
        raise ValueError(f"{where}: result {obj['id']!r} has response_token_ids of lengths "
                         f"{[len(ids) for ids in token_ids]}, response_lengths are "
                         f"{obj['response_lengths']}")
    return cls(id=str(obj["id"]), source=str(obj["source"]), level=obj["level"],
               answer=str(obj["answer"]), responses=[str(r) for r in obj["responses"]],
               correct=[bool(c) for c in obj["correct"]],
               rewards=[float(r) for r in obj["rewards"]],
               response_lengths=[int(n) for n in obj["response_lengths"]],
               response_token_ids=token_ids)


# ---------------------------------------------------------------------------------------
# Results files (JSONL, one ItemResult a line)
# ---------------------------------------------------------------------------------------


class ResultWriter:
  """An `on_result` callback appending each result to a JSONL file as it arrives.

  Each line is flushed when written, so a killed run loses at most the line being
  written; `load_results` ignores such a torn last line, the writer (not `overwrite`)
  truncates it, and the item is scored again.
  """

  def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite or not self.path.exists():
      self.path.write_text("", encoding="utf-8")
    else:
      resumable.drop_torn_tail(self.path)

  def __call__(self, result: ItemResult) -> None:
    with self.path.open("a", encoding="utf-8") as f:
      f.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
      f.flush()


def load_results(path: str | os.PathLike) -> dict[str, ItemResult]:
  """The results in a JSONL file by id (a later line wins); {} if the file is missing.

  A line that is not valid JSON is skipped with a warning if it is the last (a write cut
  off by a crash, see `ResultWriter`) and an error naming file and line otherwise.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return {}
  lines = path.read_text(encoding="utf-8").splitlines()
  results: dict[str, ItemResult] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      if all(not rest.strip() for rest in lines[number:]):
        log.warning("%s: ignoring a torn last line (%s); its item is scored again", where, e)
        continue
      raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    result = ItemResult.from_json(obj, where)
    results[result.id] = result
  return results


def write_results(results: Sequence[ItemResult], path: str | os.PathLike) -> pathlib.Path:
  """Writes results as JSONL (whole, then renamed into place)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for result in results:
      f.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
  tmp.replace(path)
  return path


# ---------------------------------------------------------------------------------------
# Tokenizer <-> model
# ---------------------------------------------------------------------------------------


def eos_token_ids(tokenizer) -> tuple[int, ...]:
  """Ids of `EOS_TOKENS` that the tokenizer has as single tokens (at least one)."""
  ids = []
  for token in EOS_TOKENS:
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if len(encoded) == 1 and encoded[0] not in ids:
      ids.append(encoded[0])
  if not ids:
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has none of the end tokens "
                     f"{EOS_TOKENS} as a single token")
  return tuple(ids)


def check_tokenizer_fits(model_config: ModelConfig, tokenizer) -> None:
  """Raises if token ids could fall outside the model or special ids disagree."""
  name = tokenizer.name_or_path or type(tokenizer).__name__
  vocab = model_config.text.vocab_size
  if len(tokenizer) > vocab:
    raise ValueError(
        f"tokenizer {name!r} has {len(tokenizer)} tokens but the model's vocab_size is "
        f"{vocab}: ids >= {vocab} have no embedding. Use the checkpoint's own tokenizer, "
        "or build the model with `tiny_model_config_for(tokenizer)`")
  special = tokenizer_lib.SpecialTokenIds.from_tokenizer(tokenizer)
  pairs = {"image_token_id": (model_config.image_token_id, special.image_pad, "<|image_pad|>"),
           "vision_start_token_id": (model_config.vision_start_token_id,
                                     special.vision_start, "<|vision_start|>"),
           "vision_end_token_id": (model_config.vision_end_token_id, special.vision_end,
                                   "<|vision_end|>")}
  for field, (model_id, tokenizer_id, token) in pairs.items():
    if model_id != tokenizer_id:
      raise ValueError(f"model config {field} is {model_id} but tokenizer {name!r} has "
                       f"{token} at id {tokenizer_id}")


def model_config_for_tokenizer(config: ModelConfig, tokenizer) -> ModelConfig:
  """`config` with vocab_size and the special-token ids taken from `tokenizer`."""
  special = tokenizer_lib.SpecialTokenIds.from_tokenizer(tokenizer)
  text = dataclasses.replace(config.text, vocab_size=len(tokenizer), eos_token_id=special.eos,
                             pad_token_id=special.pad, bos_token_id=None)
  return config.replace(text=text, image_token_id=special.image_pad,
                        video_token_id=special.video_pad,
                        vision_start_token_id=special.vision_start,
                        vision_end_token_id=special.vision_end)


def tiny_model_config_for(tokenizer, **overrides: Any) -> ModelConfig:
  """The `tiny` preset sized to `tokenizer` (e.g. the small test tokenizer, 382 ids)."""
  return model_config_for_tokenizer(get_preset("tiny", **overrides), tokenizer)


# ---------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Chunk:
  index: int  # position in the fixed chunking of the records
  batch: dict[str, Any]  # collated, `batch_size` rows
  num_real: int  # rows before the padding copies
  record_ids: tuple[str, ...]  # all records of the chunk, bad ones included


def _prepare_chunk(index: int, records: Sequence[Record], *, to_example, batch_size: int,
                   collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> _Chunk:
  first = index * batch_size  # the records' positions, which bad-record messages name
  examples = [example for example in (to_example(first + j, r) for j, r in enumerate(records))
              if example is not None]
  num_real = len(examples)
  if examples:
    # Copies of the last example fill the chunk: one shape for jit, and a row's random
    # draws do not depend on how many records of its chunk were bad.
    examples += [examples[-1]] * (batch_size - num_real)
    batch = collate(examples)
  else:
    batch = {}
  return _Chunk(index, batch, num_real, tuple(r.id for r in records))


def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """tokens: [R, N], lengths: [R] -> R strings without special tokens (`<think>` kept)."""
  rows = [row[:n].tolist() for row, n in zip(np.asarray(tokens), np.asarray(lengths))]
  return tokenizer.batch_decode(rows, skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)


def rollout_records(
    model, tokenizer, records: Sequence[Record], *,
    template: templates.TemplateConfig | Mapping[str, Any] | None = None,
    num_samples: int = 1, max_new_tokens: int = 512, temperature: float = 1.0,
    top_p: float = 1.0, top_k: int = 0, batch_size: int = 8, seed: int = 0,
    reward_fn: str | rewards_lib.RewardFn = "math",
    reward_params: Mapping[str, Any] | None = None,
    eos_ids: Sequence[int] | None = None,
    min_pixels: int = image_processing.QWEN2_5_VL_MIN_PIXELS,
    max_pixels: int = image_processing.QWEN2_5_VL_MAX_PIXELS,
    max_prompt_length: int = 2048, on_bad_record: str = "skip",
    bad_records: pipeline_lib.BadRecordReport | None = None,
    resume_from: str | os.PathLike | None = None,
    on_result: Callable[[ItemResult], None] | None = None,
    progress: bool = True, mesh: jax.sharding.Mesh | None = None,
    num_threads: int = 2) -> list[ItemResult]:
  """Samples `num_samples` responses per record and scores them.

  Args:
    model: a `Qwen2_5_VL`.
    tokenizer: the model's tokenizer (`dprl.data.tokenizer.load_tokenizer`).
    records: the items, unique ids.
    template: prompt templates (default: `TemplateConfig()`, i.e. "format").
    num_samples: K responses per record.
    max_new_tokens, temperature, top_p, top_k: sampling (temperature 0: greedy).
    batch_size: records per generate call (rows: batch_size * K).
    seed: sampling seed; equal arguments give equal results.
    reward_fn, reward_params: a `REWARD_FNS` name (or function) and its parameters.
    eos_ids: ids ending a response; default `eos_token_ids(tokenizer)`.
    min_pixels, max_pixels, max_prompt_length, on_bad_record: as `PipelineConfig`'s.
      Bad records (logged and counted into `bad_records` if given) get no result.
    resume_from: a JSONL results file; records with a result there are not sampled
      again, and their stored result is returned.
    on_result: called once per newly scored record, in record order.
    progress: show a tqdm bar.
    mesh: passed to `generate` (prompts over `data`, cache heads over `tensor`).
    num_threads: threads preparing the next chunks while the model samples.

  Returns:
    One `ItemResult` per good record, in the order of `records`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ids = [record.id for record in records]
  duplicates = sorted(rid for rid, count in collections.Counter(ids).items() if count > 1)
  if duplicates:
    raise ValueError(f"records have duplicate ids {duplicates[:10]}")
  check_tokenizer_fits(model.config, tokenizer)
  config = pipeline_lib.PipelineConfig(
      batch_size=batch_size, shuffle=False, num_epochs=1,
      template=templates.TemplateConfig() if template is None else template,
      min_pixels=min_pixels, max_pixels=max_pixels,
      patch_size=model.config.vision.patch_size,
      temporal_patch_size=model.config.vision.temporal_patch_size,
      merge_size=model.config.vision.spatial_merge_size,
      max_prompt_length=max_prompt_length, on_bad_record=on_bad_record)
  eos_ids = tuple(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer)
  pad_id = tokenizer_lib.SpecialTokenIds.from_tokenizer(tokenizer).pad
  reward_params = dict(reward_params or {})

  done = load_results(resume_from) if resume_from is not None else {}
  wanted = set(ids)
  done = {rid: result for rid, result in done.items() if rid in wanted}
  for result in done.values():
    if result.num_samples != num_samples:
      raise ValueError(f"{resume_from}: item {result.id!r} has {result.num_samples} "
                       f"responses but this run samples num_samples={num_samples}; "
                       "resume only with the settings that wrote the file")
  chunks = [list(records[i:i + batch_size]) for i in range(0, len(records), batch_size)]
  todo = [i for i, chunk in enumerate(chunks) if any(r.id not in done for r in chunk)]

  report = pipeline_lib.BadRecordReport()
  to_example = pipeline_lib.RecordToExample(tokenizer, config, report)
  patch_dim = 3 * config.temporal_patch_size * config.patch_size ** 2

  def collate(examples):
    return pipeline_lib.collate(examples, pad_id=pad_id, buckets=config.buckets,
                                patch_dim=patch_dim)

  # grain prepares (tokenize, decode and resize images) the next chunks on threads while
  # the model samples the current one.
  prepared = grain.MapDataset.source(todo).map(
      lambda i: _prepare_chunk(i, chunks[i], to_example=to_example, batch_size=batch_size,
                               collate=collate)
  ).to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2))

  key = jax.random.key(seed)
  new: dict[str, ItemResult] = {}
  num_todo = sum(r.id not in done for i in todo for r in chunks[i])
  with tqdm.tqdm(total=num_todo, unit="item", desc="rollout", disable=not progress,
                 dynamic_ncols=True) as bar:
    for chunk in prepared:
      unscored = sum(rid not in done for rid in chunk.record_ids)
      if chunk.num_real:
        for result in _sample_and_score(
            model, tokenizer, chunk, key=jax.random.fold_in(key, chunk.index),
            num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, eos_ids=eos_ids, pad_id=pad_id, reward_fn=reward_fn,
            reward_params=reward_params, mesh=mesh, prompt_buckets=config.buckets):
          if result.id in done:  # scored before the chunk was interrupted
            continue
          new[result.id] = result
          if on_result is not None:
            on_result(result)
      bar.update(unscored)
      scored = list(new.values())
      if scored:
        bar.set_postfix(acc=f"{np.mean([r.pass_rate for r in scored]):.3f}")

  if report.num_bad:
    log.warning("rollout: %s", report.summary())
  if bad_records is not None:
    for reason, count in report.counts.items():
      bad_records.counts[reason] += count
    bad_records.messages.extend(report.messages)
  return [new.get(rid) or done[rid] for rid in ids if rid in new or rid in done]


def _sample_and_score(model, tokenizer, chunk: _Chunk, *, key, num_samples: int,
                      max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                      eos_ids: tuple[int, ...], pad_id: int, reward_fn,
                      reward_params: Mapping[str, Any], mesh,
                      prompt_buckets: tuple[int, ...]) -> list[ItemResult]:
  batch = chunk.batch
  has_images = batch["image_grid_thw"].shape[0] > 0
  out = generate(model, batch["input_ids"], batch["attention_mask"],
                 batch["pixel_values"] if has_images else None,
                 batch["image_grid_thw"] if has_images else None,
                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                 top_k=top_k, seed=key, eos_token_id=eos_ids, num_samples=num_samples,
                 pad_token_id=pad_id, mesh=mesh, prompt_buckets=prompt_buckets)
  rows = chunk.num_real * num_samples  # prompt-major: the padding copies come last
  tokens = np.asarray(out.tokens)[:rows]
  lengths = np.asarray(out.lengths)[:rows]
  responses = decode_responses(tokenizer, tokens, lengths)
  token_ids = [row[:n].tolist() for row, n in zip(tokens, lengths)]
  answers = batch["answer"][:chunk.num_real]
  references = [answer for answer in answers for _ in range(num_samples)]
  rewards, correct = rewards_lib.score_responses(responses, references, reward_fn,
                                                 **reward_params)
  results = []
  for p in range(chunk.num_real):
    group = slice(p * num_samples, (p + 1) * num_samples)
    results.append(ItemResult(
        id=batch["id"][p], source=batch["source"][p], level=batch["level"][p],
        answer=batch["answer"][p], responses=responses[group],
        correct=[bool(c) for c in correct[group]],
        rewards=[float(r) for r in rewards[group]],
        response_lengths=[int(n) for n in lengths[group]],
        response_token_ids=token_ids[group]))
  return results


def pass_rates(results: Sequence[ItemResult]) -> dict[str, float]:
  """id -> pass rate, e.g. to fill `Record.pass_rate` in offline curation."""
  return {result.id: result.pass_rate for result in results}
