"""Prompt templates rendered through the Qwen2.5-VL chat template; image token expansion."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dprl.data import templates
from dprl.data import tokenizer as tok_lib
from dprl.data.records import BadRecordError, Record
from dprl.rl.registry import UnknownNameError

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  # Same chat template as Qwen2.5-VL's folder, a fraction of the build time.
  return tok_lib.load_tokenizer(
      tok_lib.write_small_tokenizer(tmp_path_factory.mktemp("tok") / "small"))


def _record(**changes):
  record = Record(id="r1", question="How many red squares?", answer="3", images=(b"png",),
                  caption="Three red squares and a blue circle.",
                  text_question="A picture shows three red squares. How many red squares?",
                  pass_rate=0.1)
  return record.replace(**changes)


def _render(tokenizer, record, names, **config):
  return templates.render_prompt(record, tokenizer,
                                 templates.TemplateConfig(names=names, **config))


def test_format_renders_image_then_question_then_instruction(tokenizer):
  rendered = _render(tokenizer, _record(), ("format",))
  assert rendered == (DEFAULT_SYSTEM + "<|im_start|>user\n" + VISION +
                      "How many red squares? " + templates.FORMAT_INSTRUCTION + ASSISTANT)
  assert "<think> </think>" in templates.FORMAT_INSTRUCTION
  assert "\\boxed{}" in templates.FORMAT_INSTRUCTION


def test_system_prompt_replaces_the_default(tokenizer):
  rendered = _render(tokenizer, _record(), "plain", system_prompt="Be brief.")
  assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" +
                      VISION + "How many red squares?" + ASSISTANT)


def test_caption_goes_before_image_and_question(tokenizer):
  rendered = _render(tokenizer, _record(), "caption+format")
  assert rendered == (DEFAULT_SYSTEM + "<|im_start|>user\n"
                      "Caption: Three red squares and a blue circle.\n" + VISION +
                      "How many red squares? " + templates.FORMAT_INSTRUCTION + ASSISTANT)


def test_text_only_uses_text_question_and_no_image(tokenizer):
  rendered = _render(tokenizer, _record(), ("text_only", "format"))
  assert "<|vision_start|>" not in rendered and "<|image_pad|>" not in rendered
  assert rendered == (DEFAULT_SYSTEM + "<|im_start|>user\n"
                      "A picture shows three red squares. How many red squares? " +
                      templates.FORMAT_INSTRUCTION + ASSISTANT)


@pytest.mark.parametrize("names,field", [("caption", "caption"),
                                         ("text_only", "text_question")])
def test_missing_field_is_a_bad_record_naming_id_and_field(names, field):
  config = templates.TemplateConfig(names=names)
  with pytest.raises(templates.MissingFieldError,
                     match=f"record 'r1': field '{field}' is empty") as info:
    templates.build_prompt(_record(**{field: None}), config)
  assert isinstance(info.value, BadRecordError)
  assert info.value.reason == templates.MISSING_FIELD


@pytest.mark.parametrize("pass_rate,hinted", [(0.0, True), (0.29, True), (0.3, False),
                                              (0.9, False), (None, False)])
def test_difficulty_hint_only_for_hard_samples(tokenizer, pass_rate, hinted):
  rendered = _render(tokenizer, _record(pass_rate=pass_rate), "format+difficulty_hint")
  assert (templates.DIFFICULTY_HINT in rendered) == hinted
  if hinted:
    assert rendered.endswith(templates.FORMAT_INSTRUCTION + " " + templates.DIFFICULTY_HINT +
                             ASSISTANT)


def test_difficulty_hint_sentence_and_threshold_are_configurable():
  config = templates.TemplateConfig(names="difficulty_hint", hint="Careful!",
                                    hint_below_pass_rate=0.6)
  prompt = templates.build_prompt(_record(pass_rate=0.5), config)
  assert prompt.after_question == ("Careful!",)


def test_choices_are_lettered_after_the_question(tokenizer):
  record = _record(choices=("2", "3", "4"), answer="B", images=())
  rendered = _render(tokenizer, record, "plain")
  assert rendered == (DEFAULT_SYSTEM + "<|im_start|>user\n"
                      "How many red squares?\nChoices:\n(A) 2\n(B) 3\n(C) 4" + ASSISTANT)


def test_several_images_each_get_vision_tokens(tokenizer):
  rendered = _render(tokenizer, _record(images=(b"a", b"b")), "plain")
  assert rendered.count(VISION) == 2
  assert VISION + VISION + "How many" in rendered


def test_messages_are_transformers_chat_format():
  messages = templates.build_messages(_record(), templates.TemplateConfig(names="caption"))
  assert messages == [{"role": "user", "content": [
      {"type": "text", "text": "Caption: Three red squares and a blue circle.\n"},
      {"type": "image"},
      {"type": "text", "text": "How many red squares?"},
  ]}]


def test_unknown_template_name_lists_the_registered_ones():
  with pytest.raises(UnknownNameError, match="unknown prompt template 'captoin'.*caption"):
    templates.TemplateConfig(names="captoin+format")
  assert set(templates.TEMPLATES) >= {"plain", "format", "caption", "text_only",
                                      "difficulty_hint"}


def test_expand_image_tokens_repeats_each_pad_per_merged_patch():
  pad = 6
  ids = [1, 3, pad, 4, 10, 3, pad, 4, 11]
  grid = np.array([[1, 4, 6], [1, 2, 2]])  # 24 / 4 = 6 tokens, 4 / 4 = 1 token
  expanded = templates.expand_image_tokens(ids, grid, pad, merge_size=2)
  assert expanded.dtype == np.int32
  assert expanded.tolist() == [1, 3] + [pad] * 6 + [4, 10, 3, pad, 4, 11]


def test_expand_image_tokens_checks_pad_count():
  with pytest.raises(ValueError, match="1 image pad tokens .* but 2 images"):
    templates.expand_image_tokens([1, 6, 2], np.array([[1, 2, 2], [1, 2, 2]]), 6)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_expand_image_tokens_keeps_text_and_counts(data):
  grids = data.draw(st.lists(st.tuples(st.just(1), st.integers(1, 8), st.integers(1, 8)),
                             max_size=4))
  grid = np.array([(t, 2 * h, 2 * w) for t, h, w in grids], np.int64).reshape(-1, 3)
  text = data.draw(st.lists(st.integers(0, 5), max_size=20))
  ids = list(text)
  for _ in grids:
    ids.insert(data.draw(st.integers(0, len(ids))), 99)
  expanded = templates.expand_image_tokens(ids, grid, 99, merge_size=2)
  assert (expanded == 99).sum() == sum(h * w for _, h, w in grids)
  assert expanded[expanded != 99].tolist() == text


def test_rendered_prompt_tokenizes_to_one_pad_per_image(tokenizer):
  rendered = _render(tokenizer, _record(images=(b"a", b"b")), "caption+format")
  ids = tokenizer.encode(rendered, add_special_tokens=False)
  pad_id = tok_lib.SpecialTokenIds.from_tokenizer(tokenizer).image_pad
  assert ids.count(pad_id) == 2
  expanded = templates.expand_image_tokens(ids, np.array([[1, 4, 4], [1, 2, 6]]), pad_id)
  assert (expanded == pad_id).sum() == 4 + 3


def test_a_mixture_gives_each_record_one_alternative_by_its_id(tokenizer):
  config = templates.TemplateConfig(names="plain|caption+format|text_only")
  assert config.alternatives == (("plain",), ("caption", "format"), ("text_only",))
  records = [_record(id=f"item-{i}") for i in range(300)]
  chosen = [config.names_for(r.id) for r in records]
  counts = {alt: chosen.count(alt) for alt in config.alternatives}
  assert all(70 <= n <= 130 for n in counts.values()), counts  # ~100 each
  # Stable: the same record gets the same rendition in another config object (process).
  again = templates.TemplateConfig(names="plain|caption+format|text_only")
  assert [again.names_for(r.id) for r in records] == chosen
  for record, names in zip(records[:12], chosen):
    rendered = templates.render_prompt(record, tokenizer, config)
    assert rendered == _render(tokenizer, record, "+".join(names))
  # dataclasses.replace (as curation does for the hint sentence) keeps the mixture.
  import dataclasses  # pylint: disable=g-import-not-at-top
  assert dataclasses.replace(config, hint="x").alternatives == config.alternatives
  assert templates.TemplateConfig(names="caption+format").alternatives == ()
  with pytest.raises(UnknownNameError, match="nope"):
    templates.TemplateConfig(names="plain|nope")


def test_question_only_drops_the_images_and_keeps_the_question(tokenizer):
  record = _record()
  rendered = _render(tokenizer, record, "question_only")
  assert "<|image_pad|>" not in rendered and "How many red squares?" in rendered
  assert rendered == _render(tokenizer, record.replace(images=()), "plain")
  assert templates.build_prompt(record, templates.TemplateConfig(names="question_only")).num_images == 0
