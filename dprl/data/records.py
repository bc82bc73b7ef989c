"""The one record schema every reader produces and every pipeline consumes.

A record is a plain dataclass of Python values so it can be written to JSONL,
array_record (via TFDS) and back without loss. Images are kept as encoded bytes
(PNG/JPEG as found on disk) so a record is self-contained once read.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Record:
  """One question with its reference answer.

  Attributes:
    id: unique within its source.
    question: the problem text, without any chat template or format instruction.
    answer: the reference answer as a string (a number, a LaTeX expression, a letter).
    images: encoded image files (PNG/JPEG bytes), in the order they appear.
    choices: multiple-choice options in order (answer is then their letter), or None.
    caption: a text description of the image(s), for caption-augmented training.
    text_question: a text-only rendition of the problem (image content in words), or None.
    source: dataset name, for per-source evaluation.
    level: a source-defined difficulty level (e.g. number of objects), or None.
    pass_rate: the base model's empirical pass rate, filled in by curation.
    metadata: free-form extra fields (JSON-serialisable).
  """

  id: str
  question: str
  answer: str
  images: tuple[bytes, ...] = ()
  choices: tuple[str, ...] | None = None
  caption: str | None = None
  text_question: str | None = None
  source: str = "unknown"
  level: int | None = None
  pass_rate: float | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def replace(self, **changes: Any) -> "Record":
    return dataclasses.replace(self, **changes)


class BadRecordError(ValueError):
  """A record that cannot be used; the message names the record id, file and field."""
