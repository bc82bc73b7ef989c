"""Prompt templates: how a `Record` becomes the chat Qwen2.5-VL is prompted with.

A template is a registered function `(prompt, record, config) -> prompt` that edits the
pieces of the user turn (`Prompt`); a config lists templates by name and they apply in
order, so `"caption+format"` puts the caption before the image and the format
instruction after the question. Registered:

  plain            the question (and its choices), images first; the starting point.
  format           appends the format instruction: reason in <think> </think>, answer
                   in \\boxed{} (EasyR1's math prompt, which the papers' code uses).
  caption          puts "Caption: {caption}" before the image(s) and question
                   (Infi-MMR phase 2, cross-modal adaptation).
  text_only        the record's `text_question`, no image (Infi-MMR phase 1).
  question_only    the question alone, its images dropped (RAP's text arm of the causal
                   discrepancy; in a warm-start mixture, the answer prior a model falls
                   back on without the image).
  difficulty_hint  appends a configurable sentence to hard samples, those whose
                   `pass_rate` is below a threshold (difficulty-prior paper, stage 2).

The user turn is [caption text][image]*n[question + appended sentences], which the
Qwen2.5-VL chat template renders with each image as
<|vision_start|><|image_pad|><|vision_end|>. After the images are processed, each
<|image_pad|> is expanded to t*h*w / merge_size**2 copies (`expand_image_tokens`), one per
merged patch the vision tower emits.

A mixture, `"plain|caption|text_only"`, gives each record one of the alternatives (each
itself may be `"a+b"`), chosen by a stable hash of the record's id: a warm start that
should leave the model able to answer all three renditions (the Infi-MMR experiment's
base) sees each record in one of them, the same one in every epoch and process.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dprl.data.records import BadRecordError, Record
from dprl.rl.registry import Registry

# EasyR1's examples/format_prompt/math.jinja, appended after the question.
FORMAT_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then "
    "provide the final answer. The reasoning process MUST BE enclosed within "
    "<think> </think> tags. The final answer MUST BE put in \\boxed{}.")
# The difficulty-prior paper's sentence is not public; this is dprl's (configurable).
DIFFICULTY_HINT = ("This problem is hard. Reason carefully step by step, then check your "
                   "answer before you give it.")
CAPTION_FORMAT = "Caption: {caption}"

# Reason (`MissingFieldError.reason`) counted by the pipeline.
MISSING_FIELD = "missing_field"


class MissingFieldError(BadRecordError):
  """A template needs a record field that is empty (e.g. `caption` for "caption")."""

  reason = MISSING_FIELD


@dataclasses.dataclass(frozen=True)
class TemplateConfig:
  """Which templates apply, in order, and their texts.

  Attributes:
    names: registered template names applied in order (a "a+b" string also works); for
      a mixture ("a|b+c"), the first alternative's (`alternatives` holds them all).
    format_instruction: appended by "format".
    caption_format: "caption"'s text; `{caption}` is the record's caption.
    hint: appended by "difficulty_hint" to records with pass_rate < hint_below_pass_rate.
      Records without a pass rate get no hint.
    hint_below_pass_rate: what counts as hard. 0.3 is dprl's choice (the paper's
      threshold is not public); set it from the curated pass-rate histogram.
    system_prompt: a system turn, or None for the template's default
      ("You are a helpful assistant.").
  """

  names: tuple[str, ...] | str = ("format",)
  format_instruction: str = FORMAT_INSTRUCTION
  caption_format: str = CAPTION_FORMAT
  hint: str = DIFFICULTY_HINT
  hint_below_pass_rate: float = 0.3
  system_prompt: str | None = None
  alternatives: tuple[tuple[str, ...], ...] = ()  # set from a mixture in `names`

  def __post_init__(self):
    mixture = parse_template_mixture(self.names)
    if len(mixture) > 1:
      object.__setattr__(self, "alternatives", mixture)
    else:  # alternatives carried over by dataclasses.replace stay
      object.__setattr__(self, "alternatives", tuple(parse_template_names(a) for a in self.alternatives))
    object.__setattr__(self, "names", mixture[0])

  def names_for(self, record_id: str) -> tuple[str, ...]:
    """The templates a record gets: `names`, or its alternative of a mixture."""
    if not self.alternatives:
      return self.names
    return self.alternatives[zlib.crc32(str(record_id).encode()) % len(self.alternatives)]


@dataclasses.dataclass(frozen=True)
class Prompt:
  """The pieces of one user turn, before the chat template.

  Attributes:
    question: the problem text (with its choices).
    num_images: images shown, between the leading text and the question.
    before_images: text blocks placed before the images (a caption), one per line.
    after_question: sentences appended after the question (format, hint), space-joined.
    system: the system turn, or None for the chat template's default.
  """

  question: str
  num_images: int
  before_images: tuple[str, ...] = ()
  after_question: tuple[str, ...] = ()
  system: str | None = None

  def replace(self, **changes: Any) -> Prompt:
    return dataclasses.replace(self, **changes)


Template = Callable[[Prompt, Record, TemplateConfig], Prompt]
TEMPLATES = Registry("prompt template")


def parse_template_names(names: str | Sequence[str]) -> tuple[str, ...]:
  """"caption+format" or ("caption", "format") -> ("caption", "format"), names checked."""
  if isinstance(names, str):
    names = [name.strip() for name in names.split("+")]
  names = tuple(names)
  for name in names:
    TEMPLATES[name]  # pylint: disable=pointless-statement  # raises on an unknown name
  return names


def parse_template_mixture(names: str | Sequence[str]) -> tuple[tuple[str, ...], ...]:
  """"plain|caption+format" -> (("plain",), ("caption", "format")); a single alternative
  ("caption+format", or a sequence of names) -> one tuple."""
  if isinstance(names, str):
    return tuple(parse_template_names(part) for part in names.split("|"))
  return (parse_template_names(names),)


def question_with_choices(record: Record) -> str:
  """The question, followed by lettered choices for a multiple-choice record."""
  if not record.choices:
    return record.question
  lines = [f"({chr(ord('A') + i)}) {choice}" for i, choice in enumerate(record.choices)]
  return record.question + "\nChoices:\n" + "\n".join(lines)


@TEMPLATES.register("plain")
def plain(prompt: Prompt, record: Record, config: TemplateConfig) -> Prompt:
  del record, config
  return prompt


@TEMPLATES.register("format")
def format_instruction(prompt: Prompt, record: Record, config: TemplateConfig) -> Prompt:
  del record
  return prompt.replace(after_question=prompt.after_question + (config.format_instruction,))


@TEMPLATES.register("caption")
def caption(prompt: Prompt, record: Record, config: TemplateConfig) -> Prompt:
  if not record.caption:
    raise MissingFieldError(f"record {record.id!r}: field 'caption' is empty, but the "
                            "'caption' template needs it")
  text = config.caption_format.format(caption=record.caption)
  return prompt.replace(before_images=prompt.before_images + (text,))


@TEMPLATES.register("text_only")
def text_only(prompt: Prompt, record: Record, config: TemplateConfig) -> Prompt:
  del config
  if not record.text_question:
    raise MissingFieldError(f"record {record.id!r}: field 'text_question' is empty, but "
                            "the 'text_only' template needs it")
  return prompt.replace(question=question_with_choices(record.replace(
      question=record.text_question)), num_images=0)


@TEMPLATES.register("question_only")
def question_only(prompt: Prompt, record: Record, config: TemplateConfig) -> Prompt:
  del record, config
  return prompt.replace(num_images=0)


@TEMPLATES.register("difficulty_hint")
def difficulty_hint(prompt: Prompt, record: Record, config: TemplateConfig) -> Prompt:
  if record.pass_rate is None or record.pass_rate >= config.hint_below_pass_rate:
    return prompt
  return prompt.replace(after_question=prompt.after_question + (config.hint,))


def build_prompt(record: Record, config: TemplateConfig) -> Prompt:
  """Applies the record's templates (`config.names_for`) in order to its plain prompt."""
  prompt = Prompt(question=question_with_choices(record), num_images=len(record.images),
                  system=config.system_prompt)
  for name in config.names_for(record.id):
    prompt = TEMPLATES[name](prompt, record, config)
  return prompt


def prompt_messages(prompt: Prompt) -> list[dict[str, Any]]:
  """The chat messages (transformers' format) of a prompt, for `apply_chat_template`."""
  content: list[dict[str, Any]] = []
  if prompt.before_images:
    content.append({"type": "text", "text": "\n".join(prompt.before_images) + "\n"})
  content.extend({"type": "image"} for _ in range(prompt.num_images))
  content.append({"type": "text", "text": " ".join((prompt.question,) +
                                                   prompt.after_question)})
  messages = [{"role": "user", "content": content}]
  if prompt.system is not None:
    messages.insert(0, {"role": "system", "content": prompt.system})
  return messages


def build_messages(record: Record, config: TemplateConfig) -> list[dict[str, Any]]:
  return prompt_messages(build_prompt(record, config))


def render_prompt(record: Record, tokenizer, config: TemplateConfig) -> str:
  """The prompt string the model continues: the chat, then "<|im_start|>assistant\\n".

  Uses the tokenizer's own chat template, so a checkpoint's template is honoured.
  """
  return tokenizer.apply_chat_template(build_messages(record, config), tokenize=False,
                                       add_generation_prompt=True)


def expand_image_tokens(token_ids: Sequence[int] | np.ndarray, image_grid_thw: np.ndarray,
                        image_pad_id: int, merge_size: int = 2) -> np.ndarray:
  """Repeats the i-th image pad token once per merged patch of image i.

  Args:
    token_ids: [T] a tokenized prompt with one `image_pad_id` per image.
    image_grid_thw: [N, 3] (t, h, w) patches per image, N = number of pad tokens.
    image_pad_id: id of <|image_pad|>.
    merge_size: the vision merger's window side; each image gives t*h*w / merge_size**2
      tokens.

  Returns:
    [T - N + sum_i t_i*h_i*w_i / merge_size**2] int32.
  """
  token_ids = np.asarray(token_ids, np.int32)
  image_grid_thw = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  positions = np.flatnonzero(token_ids == image_pad_id)
  if len(positions) != len(image_grid_thw):
    raise ValueError(f"{len(positions)} image pad tokens (id {image_pad_id}) but "
                     f"{len(image_grid_thw)} images in image_grid_thw")
  patches = np.prod(image_grid_thw, axis=-1)
  if np.any(image_grid_thw[:, 1:] % merge_size):
    raise ValueError(f"image grids {image_grid_thw.tolist()} are not divisible by "
                     f"merge_size {merge_size}")
  repeats = np.ones(len(token_ids), np.int64)
  repeats[positions] = patches // (merge_size * merge_size)
  return np.repeat(token_ids, repeats)
