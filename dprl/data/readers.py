"""Readers that turn the JSONL (+ image folder) layouts users bring into `Record`s.

`read_records(path, layout=...)` picks a parser from `LAYOUTS` by name. Every parser
sees one raw JSON object and either returns a `Record` or raises `_Skip` naming the
field at fault; the driver (`iter_records`) turns that into a logged, counted skip, or
into a `BadRecordError` naming file, line, id and field when `strict=True`. Nothing is
dropped silently: pass a `ReadReport` to see the counts by reason, and a summary is
logged at the end of every file.

Files may be JSONL (one object a line; locations are `file:line`) or one JSON document
holding a list or a dict of objects (MathVista ships `testmini.json` as a dict keyed by
pid); locations are then `file[key]`. Image paths are relative to `image_root`, which
defaults to the data file's folder; a `file://` prefix is accepted. Every image is read
to bytes and must decode with PIL (`verify()` then `load()`, since `verify()` alone
misses truncated files).

Layouts (assumptions about third-party formats are stated in each parser):
  geometry3k / k12 / easyr1  EasyR1 style: `images`, `problem` with `<image>`, `answer`.
  mm_eureka                  chat messages (`message` / `messages` / `conversations`).
  mathvista                  MathVista testmini (`pid`, `question`, `image`, `choices`).
  mathverse                  MathVerse testmini (`sample_index`, `problem_version`, ...).
  dprl                       what `write_jsonl` writes: every `Record` field, lossless.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
import re
from typing import Any, Callable, Iterator, Sequence

from PIL import Image

from dprl.data.records import BadRecordError, Record

log = logging.getLogger(__name__)

# Skip reasons, the keys of `ReadReport.skipped`.
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
DUPLICATE_ID = "duplicate_id"

_IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass
class ReadReport:
  """What a read kept and what it skipped, by reason (one of the constants above)."""

  num_read: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  # One line per skipped record: "file:line: record 'id': field 'f': reason: detail".
  problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def summary(self) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
    return f"read {self.num_read} records, skipped {self.num_skipped} ({reasons})"


class _Skip(Exception):
  """Raised by a layout parser for a record that cannot be used."""

  def __init__(self, reason: str, field: str, detail: str):
    super().__init__(detail)
    self.reason, self.field, self.detail = reason, field, detail


@dataclasses.dataclass
class _Context:
  """What a parser may use besides the raw object: where it is and how to read images."""

  data_path: pathlib.Path
  image_root: pathlib.Path
  location: str  # "file:line" or "file[key]"
  fallback_id: str  # used by layouts whose records carry no id
  source: str

  def load_image(self, ref: Any, field: str) -> bytes:
    if not isinstance(ref, str) or not ref.strip():
      raise _Skip(BAD_FIELD, field, f"image reference must be a non-empty path, got {ref!r}")
    path = ref.strip().removeprefix("file://")
    full = self.image_root / path  # an absolute `path` wins over the root, as intended
    try:
      data = full.read_bytes()
    except FileNotFoundError:
      raise _Skip(MISSING_IMAGE, field, f"image file not found: {full}") from None
    except OSError as e:
      raise _Skip(MISSING_IMAGE, field, f"image file unreadable: {full}: {e}") from None
    try:
      verify_image_bytes(data)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...).
      raise _Skip(CORRUPT_IMAGE, field, f"image does not decode: {full}: {e}") from None
    return data


def verify_image_bytes(data: bytes) -> None:
  """Raises if `data` is not a fully decodable image."""
  with Image.open(io.BytesIO(data)) as image:
    image.verify()
  # `verify()` checks structure only; a truncated file passes it, so decode too.
  with Image.open(io.BytesIO(data)) as image:
    image.load()


# ------------------------------------------------------------------ layout registry

Parser = Callable[[dict, _Context], Record]


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  parse: Parser
  default_source: str


LAYOUTS: dict[str, Layout] = {}


def register_layout(*names: str, source: str | None = None):
  """Registers a parser under each name; `source` defaults to the name itself."""

  def decorate(parse: Parser) -> Parser:
    for name in names:
      if name in LAYOUTS:
        raise ValueError(f"layout {name!r} registered twice")
      LAYOUTS[name] = Layout(name, parse, source or name)
    return parse

  return decorate


# ------------------------------------------------------------------ field helpers


def _required_str(raw: dict, field: str, *, allow_empty: bool = False) -> str:
  if field not in raw or raw[field] is None:
    raise _Skip(MISSING_FIELD, field, "field is missing")
  value = raw[field]
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise _Skip(BAD_FIELD, field, f"expected a string, got {type(value).__name__}")
  value = str(value).strip()
  if not value and not allow_empty:
    raise _Skip(MISSING_FIELD, field, "field is empty")
  return value


def _answer(raw: dict, field: str = "answer") -> str:
  # Answers arrive as strings or bare JSON numbers (e.g. 3 or 1.5); keep their text.
  return _required_str(raw, field)


def _id(raw: dict, field: str, ctx: _Context) -> str:
  if field in raw and raw[field] is not None and str(raw[field]).strip():
    return str(raw[field]).strip()
  return ctx.fallback_id


def _as_list(value: Any, field: str) -> list:
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  if isinstance(value, list):
    return value
  raise _Skip(BAD_FIELD, field, f"expected a path or a list of paths, got {type(value).__name__}")


def _extra(raw: dict, used: Sequence[str]) -> dict[str, Any]:
  """Fields a parser did not consume, kept in `metadata` so nothing is lost."""
  return {k: v for k, v in raw.items() if k not in used}


def _strip_placeholders(text: str) -> tuple[str, int]:
  count = text.count(_IMAGE_PLACEHOLDER)
  # The template places image tokens itself; a placeholder left in the text would be
  # tokenised as literal characters.
  return re.sub(r"<image>[ \t]*\n?", "", text).strip(), count


# ------------------------------------------------------------------ layouts


@register_layout("geometry3k", "easyr1")
@register_layout("k12", source="k12")
def parse_easyr1(raw: dict, ctx: _Context) -> Record:
  """EasyR1 style (hiyouga/geometry3k, K12 free-form exports).

  Assumed fields: `problem` (falls back to `question`) with one `<image>` per image,
  `answer`, `images` (list of paths; a single `image` path is accepted too), optional
  `id`. When placeholders are present their count must equal the number of images.
  """
  question_field = "problem" if "problem" in raw else "question"
  problem = _required_str(raw, question_field)
  answer = _answer(raw)
  image_field = "images" if "images" in raw else "image"
  refs = _as_list(raw.get(image_field), image_field)
  question, placeholders = _strip_placeholders(problem)
  if placeholders and placeholders != len(refs):
    raise _Skip(BAD_FIELD, question_field,
                f"{placeholders} <image> placeholders but {len(refs)} images")
  images = tuple(ctx.load_image(r, f"{image_field}[{i}]") for i, r in enumerate(refs))
  return Record(
      id=_id(raw, "id", ctx), question=question, answer=answer, images=images,
      source=ctx.source,
      metadata=_extra(raw, ("id", question_field, "answer", image_field)))


def _message_list(raw: dict) -> tuple[str, list]:
  for field in ("message", "messages", "conversations"):
    if field in raw:
      value = raw[field]
      if isinstance(value, str):
        try:
          value = json.loads(value)
        except json.JSONDecodeError as e:
          raise _Skip(MALFORMED_JSON, field, f"messages string is not JSON: {e}") from None
      if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise _Skip(BAD_FIELD, field, "expected a list of {role, content} messages")
      return field, value
  raise _Skip(MISSING_FIELD, "message", "none of message / messages / conversations")


@register_layout("mm_eureka", "mmeureka")
def parse_mm_eureka(raw: dict, ctx: _Context) -> Record:
  """MM-Eureka style chat records (FanqingM/MM-Eureka-Dataset, the RAP selection data).

  Assumed, from the MM-Eureka README and dataset card: `id`; `message` (also
  `messages` / `conversations`) as a list of `{role, content}` or a JSON string of
  one; `content` is a string (with `<image>` placeholders) or a list of
  `{"type": "image", "image": path}` / `{"type": "text", "text": ...}` parts; image
  paths may instead (or also) be listed in `image_urls` / `images` / `image`, often with
  a `file://` prefix; `answer`. The question is the text of the user turns joined by
  newlines; the system turn (MM-Eureka's format instruction, which dprl's templates
  replace) is kept in `metadata["system_prompt"]`; assistant turns are ignored. Images
  named in the content win over the top-level list, which is used only when the
  content names none.
  """
  messages_field, messages = _message_list(raw)
  texts, content_refs, system = [], [], []
  for i, message in enumerate(messages):
    role, content = message.get("role"), message.get("content")
    where = f"{messages_field}[{i}].content"
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
      raise _Skip(BAD_FIELD, where, f"expected a string or a list, got {type(content).__name__}")
    for j, part in enumerate(parts):
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text" and isinstance(part.get("text"), str):
        (system if role == "system" else texts if role == "user" else []).append(part["text"])
      elif kind in ("image", "image_url") and role == "user":
        ref = part.get("image", part.get("image_url"))
        ref = ref.get("url") if isinstance(ref, dict) else ref
        if isinstance(ref, str) and ref.strip() and ref.strip() != _IMAGE_PLACEHOLDER:
          content_refs.append((f"{where}[{j}].image", ref))
      elif kind not in ("image", "image_url", "text"):
        raise _Skip(BAD_FIELD, f"{where}[{j}]", f"unknown content part {part!r}")
  question, _ = _strip_placeholders("\n".join(t for t in texts if t.strip()))
  if not question:
    raise _Skip(MISSING_FIELD, messages_field, "no user text in the messages")
  answer = _answer(raw)
  refs = content_refs
  top_field = next((f for f in ("image_urls", "images", "image") if f in raw), None)
  if not refs and top_field:
    refs = [(f"{top_field}[{i}]", r) for i, r in enumerate(_as_list(raw[top_field], top_field))]
  images = tuple(ctx.load_image(ref, field) for field, ref in refs)
  metadata = _extra(raw, ("id", messages_field, "answer", top_field))
  if system:
    metadata["system_prompt"] = "\n".join(system)
  return Record(id=_id(raw, "id", ctx), question=question, answer=answer, images=images,
                source=ctx.source, metadata=metadata)


@register_layout("mathvista")
def parse_mathvista(raw: dict, ctx: _Context) -> Record:
  """MathVista testmini (AI4Math/MathVista `testmini.json` or a JSONL of its rows).

  Fields: `pid`, `question`, `image` (path), `choices` (list or null), `answer`,
  `question_type` ("multi_choice" / "free_form"), `answer_type`, `precision`, `unit`,
  `query` (the official prompt with hint), `metadata`. For multi_choice the dataset's
  answer is the option text; the record's answer becomes its letter (A, B, ...), as
  `Record` asks, and the text is kept in `metadata["answer_text"]`.
  """
  rid = _required_str(raw, "pid")
  question = _required_str(raw, "question")
  answer = _answer(raw)
  image = ctx.load_image(_required_str(raw, "image"), "image")
  choices = None
  metadata = _extra(raw, ("pid", "question", "answer", "image", "choices"))
  if raw.get("question_type") == "multi_choice":
    options = raw.get("choices")
    if not isinstance(options, list) or not options:
      raise _Skip(MISSING_FIELD, "choices", "multi_choice question without choices")
    choices = tuple(str(c) for c in options)
    if answer not in choices:
      raise _Skip(BAD_FIELD, "answer", f"answer {answer!r} is not one of the choices")
    metadata["answer_text"] = answer
    answer = chr(ord("A") + choices.index(answer))
  elif raw.get("choices") is not None:
    metadata["choices"] = raw["choices"]
  return Record(id=rid, question=question, answer=answer, images=(image,), choices=choices,
                source=ctx.source, metadata=metadata)


# MathVerse's "Vision Only" problems have an empty question: all of it is in the image.
MATHVERSE_VISION_ONLY_QUESTION = "Answer the question shown in the image."


@register_layout("mathverse")
def parse_mathverse(raw: dict, ctx: _Context) -> Record:
  """MathVerse testmini (AI4Math/MathVerse `testmini.json` or a JSONL of its rows).

  Fields: `sample_index`, `problem_index`, `problem_version` ("Text Dominant", ...,
  "Vision Only", "Text Only"), `question`, `image` (path; empty for Text Only),
  `answer` (the option letter for multi-choice), `question_type` ("multi-choice" /
  "free-form"), `query_wo`, `query_cot`, `question_for_eval`, `metadata`. Multiple
  choice options are written inside the question text, so `choices` stays None and
  the answer is already a letter. An empty question (Vision Only) becomes
  `MATHVERSE_VISION_ONLY_QUESTION`; the official prompts stay in metadata.
  """
  rid = _required_str(raw, "sample_index")
  question = _required_str(raw, "question", allow_empty=True) or MATHVERSE_VISION_ONLY_QUESTION
  answer = _answer(raw)
  image_ref = raw.get("image")
  images = (ctx.load_image(image_ref, "image"),) if image_ref else ()
  return Record(id=rid, question=question, answer=answer, images=images, source=ctx.source,
                metadata=_extra(raw, ("sample_index", "question", "answer", "image")))


_RECORD_FIELDS = {f.name for f in dataclasses.fields(Record)}


@register_layout("dprl", source="unknown")
def parse_dprl(raw: dict, ctx: _Context) -> Record:
  """What `write_jsonl` writes: every `Record` field, images as relative paths."""
  unknown = set(raw) - _RECORD_FIELDS
  if unknown:
    raise _Skip(BAD_FIELD, sorted(unknown)[0], "not a Record field")
  refs = _as_list(raw.get("images"), "images")
  images = tuple(ctx.load_image(r, f"images[{i}]") for i, r in enumerate(refs))
  choices = raw.get("choices")
  checks = {
      "id": isinstance(raw.get("id"), str), "question": isinstance(raw.get("question"), str),
      "answer": isinstance(raw.get("answer"), str),
      "choices": choices is None or (isinstance(choices, list)
                                     and all(isinstance(c, str) for c in choices)),
      "caption": raw.get("caption") is None or isinstance(raw["caption"], str),
      "text_question": raw.get("text_question") is None or isinstance(raw["text_question"], str),
      "source": isinstance(raw.get("source", ""), str),
      "level": raw.get("level") is None or (isinstance(raw["level"], int)
                                            and not isinstance(raw["level"], bool)),
      "pass_rate": raw.get("pass_rate") is None or (isinstance(raw["pass_rate"], (int, float))
                                                    and not isinstance(raw["pass_rate"], bool)),
      "metadata": isinstance(raw.get("metadata", {}), dict),
  }
  for field, ok in checks.items():
    if field in ("id", "question", "answer") and field not in raw:
      raise _Skip(MISSING_FIELD, field, "field is missing")
    if not ok:
      raise _Skip(BAD_FIELD, field, f"wrong type: {raw.get(field)!r}")
  return Record(
      id=raw["id"], question=raw["question"], answer=raw["answer"], images=images,
      choices=None if choices is None else tuple(choices), caption=raw.get("caption"),
      text_question=raw.get("text_question"), source=raw.get("source", ctx.source),
      level=raw.get("level"),
      pass_rate=None if raw.get("pass_rate") is None else float(raw["pass_rate"]),
      metadata=raw.get("metadata", {}))


# ------------------------------------------------------------------ driver


def _raw_items(path: pathlib.Path) -> Iterator[tuple[str, str, dict | _Skip]]:
  """Yields (location, fallback id, object or the reason it is unusable)."""
  if path.suffix == ".json":
    try:
      document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise BadRecordError(f"{path}:{e.lineno}: the file is not valid JSON: {e.msg}") from None
    if isinstance(document, dict):
      items = list(document.items())
    elif isinstance(document, list):
      items = list(enumerate(document))
    else:
      raise BadRecordError(f"{path}: expected a JSON list or dict of records")
    for key, obj in items:
      bad = None if isinstance(obj, dict) else _Skip(MALFORMED_JSON, "<record>", "not an object")
      yield f"{path}[{key}]", f"{path.stem}-{key}", bad or obj
    return
  with path.open(encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        obj = _Skip(MALFORMED_JSON, "<line>", f"not valid JSON: {e.msg} at column {e.colno}")
      else:
        if not isinstance(obj, dict):
          obj = _Skip(MALFORMED_JSON, "<line>", "the line is not a JSON object")
      yield f"{path}:{line_number}", f"{path.stem}-{line_number}", obj


def iter_records(path: str | os.PathLike, layout: str = "geometry3k",
                 image_root: str | os.PathLike | None = None, strict: bool = False,
                 report: ReadReport | None = None, source: str | None = None
                 ) -> Iterator[Record]:
  """Yields the usable records of one file, in file order.

  Args:
    path: a `.jsonl` file, or a `.json` file holding a list or dict of records.
    layout: a key of `LAYOUTS`.
    image_root: folder that image paths are relative to; default: the file's folder.
    strict: raise `BadRecordError` on the first bad record instead of skipping it.
    report: filled in with counts of read and skipped records (by reason).
    source: `Record.source`; default: the layout's (e.g. "geometry3k").
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
  spec = LAYOUTS[layout]
  path = pathlib.Path(path)
  root = pathlib.Path(image_root) if image_root is not None else path.parent
  report = report if report is not None else ReadReport()
  seen_ids: set[str] = set()
  for location, fallback_id, obj in _raw_items(path):
    rid = "?"
    try:
      if isinstance(obj, _Skip):
        raise obj
      for key in ("id", "pid", "sample_index"):
        if obj.get(key) is not None:
          rid = str(obj[key])
          break
      ctx = _Context(path, root, location, fallback_id, source or spec.default_source)
      record = spec.parse(obj, ctx)
      rid = record.id
      if record.id in seen_ids:
        raise _Skip(DUPLICATE_ID, "id", "an earlier record has the same id")
      seen_ids.add(record.id)
    except _Skip as skip:
      message = (f"{location}: record {rid!r}: field {skip.field!r}: "
                 f"{skip.reason}: {skip.detail}")
      if strict:
        raise BadRecordError(message) from None
      report.skipped[skip.reason] += 1
      report.problems.append(message)
      log.warning("skipping bad record: %s", message)
      continue
    report.num_read += 1
    yield record
  log_level = logging.WARNING if report.num_skipped else logging.INFO
  log.log(log_level, "%s (layout %s): %s", path, layout, report.summary())


def read_records(path: str | os.PathLike, layout: str = "geometry3k",
                 image_root: str | os.PathLike | None = None, strict: bool = False,
                 report: ReadReport | None = None, source: str | None = None
                 ) -> list[Record]:
  """All usable records of one file; see `iter_records` for the arguments."""
  return list(iter_records(path, layout, image_root, strict, report, source))


# ------------------------------------------------------------------ writer

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "WEBP": "webp",
               "TIFF": "tiff"}


def _image_file_name(data: bytes) -> str:
  # Content-addressed: identical images (MathVerse reuses one image across problem
  # versions) are stored once, and names never collide whatever the record ids contain.
  with Image.open(io.BytesIO(data)) as image:
    extension = _EXTENSIONS.get(image.format or "", "img")
  return f"{hashlib.sha256(data).hexdigest()[:20]}.{extension}"


def record_to_json(record: Record, image_paths: Sequence[str]) -> dict[str, Any]:
  """The `dprl` layout's JSON object for `record`, with its images at `image_paths`."""
  row = dataclasses.asdict(record)
  row["images"] = list(image_paths)
  row["choices"] = None if record.choices is None else list(record.choices)
  return row


def write_jsonl(records: Sequence[Record] | Iterator[Record], path: str | os.PathLike,
                image_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Writes records in the `dprl` layout; `read_records(path, layout="dprl")` reloads them.

  Images are written as files, byte for byte as held in the record, into `image_dir`
  (default: `<stem>_images/` next to the JSONL) under content-hash names; the JSONL
  refers to them by paths relative to its own folder, so the pair can be moved together.
  Round trips are exact for every field as long as `metadata` holds JSON-native values
  (str keys; lists, not tuples).

  Returns the JSONL path.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image_dir = pathlib.Path(image_dir) if image_dir is not None else (
      path.parent / f"{path.stem}_images")
  image_dir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for record in records:
      names = []
      for data in record.images:
        target = image_dir / _image_file_name(data)
        if not target.exists():
          target.write_bytes(data)
        names.append(os.path.relpath(target, path.parent))
      try:
        line = json.dumps(record_to_json(record, names), ensure_ascii=False)
      except TypeError as e:
        raise BadRecordError(f"record {record.id!r}: field 'metadata': not JSON: {e}") from None
      f.write(line + "\n")
  # Written whole then renamed, so a crash never leaves a half-written dataset behind.
  tmp.replace(path)
  return path
