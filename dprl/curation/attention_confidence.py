"""ACE, the attention confidence estimator of RAP (arXiv 2506.04755).

A sampled response is teacher-forced (`[prompt | response]` through the model, as the
learner computes log-probs) and one decoder layer's attention probabilities are read,
averaged over heads, on the response block: `A[i, j]`, query response token i, key
response token j. For each response token j,

    psi_j = prod_{i >= j} sigma * A[i, j]        over valid response queries i >= j,

how strongly every later token keeps attending to j. The released RAP code does not
implement ACE, so this follows the paper's formula. A sample is dropped when an
*uninformative* token (punctuation, stop words; matched on decoded token strings) has
psi_j > lambda_a: the reasoning is anchored on a token that carries no content.

Log space. A response of N tokens multiplies up to N factors that are mostly far below 1,
so psi underflows even float64 long before N = 2048; `log psi_j = sum_{i >= j} (log sigma
+ log A[i, j])` stays finite. It is -inf only when some factor is exactly 0, where psi
truly is 0.

Memory. The model runs only up to layer L (`stop_at_layer`: the residual stream entering
L; no later layer, no logits), and every layer before it attends `query_chunk` queries at
a time. Layer L's attention is then recomputed from that input (its RMSNorm, q/k with
biases, 3-D rotary, GQA, float32 softmax) for the response queries only, `query_chunk` at
a time, each chunk adding its rows' share of `log psi_j` (`response_log_psi_from_layer`).
No `[B, H, T, T]` array exists: the attention scores and probabilities are at most
`[B, H, chunk, T]` float32, `4 * B * H * chunk * T` bytes (Qwen2.5-VL-7B, H = 28,
T = 4096, chunk = 128: 59 MB per row, against 1.9 GB for the whole layer), and the largest
arrays left are the MLP's `[B, T, intermediate]` activations. benchmarks/ace_memory.py
measures it (XLA's memory analysis of both compiled paths). The whole-layer read
(`model(..., attention_layers=(L,))`, `query_chunk=None`) is kept as the reference the
tests compare with.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dprl.data import pipeline as pipeline_lib
from dprl.data import tokenizer as tokenizer_lib
from dprl.data.records import Record
from dprl.models import layers
from dprl.models import rope
from dprl.rl.registry import Registry
from dprl.sampling import bucket

DEFAULT_SIGMA = 2.0
DEFAULT_LAMBDA = 0.1

# Uninformative tokens, compared with the decoded token stripped of surrounding
# whitespace and lower-cased. "" stands for whitespace-only tokens (spaces, newlines),
# which attention sinks favour.
STOP_WORDS = (
    "a", "an", "the", "of", "to", "in", "on", "at", "by", "for", "with", "from", "and", "or",
    "but", "so", "then", "thus", "is", "are", "was", "were", "be", "been", "it", "its",
    "this", "that", "these", "those", "as", "we", "i", "us", "let", "s", "there", "here",
    "which", "what", "can", "will", "do", "does", "now", "first", "next")
DEFAULT_UNINFORMATIVE = ("",) + tuple(string.punctuation) + STOP_WORDS


def log_attention_confidence(attention: jax.Array, mask: jax.Array,
                             sigma: float = DEFAULT_SIGMA) -> jax.Array:
  """log psi_j = sum over valid i >= j of (log sigma + log A[i, j]).

  Args:
    attention: [..., N, N] float attention probabilities, query i (rows), key j (columns).
    mask: [..., N] bool, True on real response tokens.
    sigma: the scale of the paper's product (2.0).

  Returns:
    [..., N] float32 log psi; -inf where mask is False.
  """
  attention = jnp.asarray(attention, jnp.float32)
  mask = jnp.asarray(mask, bool)
  n = attention.shape[-1]
  if attention.shape[-2:] != (n, n) or mask.shape != attention.shape[:-1]:
    raise ValueError(f"attention must be [..., N, N] and mask [..., N], got "
                     f"{attention.shape} and {mask.shape}")
  later = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]  # [N(i), N(j)]: i >= j
  valid = later & mask[..., :, None] & mask[..., None, :]
  # log(0) = -inf is kept: a zero factor makes psi exactly 0.
  terms = jnp.where(valid, jnp.log(sigma) + jnp.log(attention), 0.0)
  return jnp.where(mask, terms.sum(axis=-2), -jnp.inf)


def max_over(log_psi: np.ndarray | jax.Array, select: np.ndarray | jax.Array
             ) -> tuple[np.ndarray, np.ndarray]:
  """The largest log psi among selected tokens per row, and its index.

  Args:
    log_psi: [B, N]; select: [B, N] bool (the uninformative, valid tokens).
  Returns:
    max [B] float (-inf for a row with none selected), argmax [B] int (-1 for none).
  """
  log_psi = np.asarray(log_psi, np.float64)
  select = np.asarray(select, bool)
  masked = np.where(select, log_psi, -np.inf)
  index = np.argmax(masked, axis=-1)
  best = np.take_along_axis(masked, index[..., None], axis=-1)[..., 0]
  return best, np.where(select.any(-1), index, -1)


class TokenMatcher:
  """Which token ids are uninformative, decided on each id's decoded string.

  Decoding one id at a time is what "matched on decoded token strings" means for
  byte-level BPE: " the" and "the" are different ids with one meaning. Results are cached.
  """

  def __init__(self, tokenizer, tokens: Iterable[str] = DEFAULT_UNINFORMATIVE, *,
               case_sensitive: bool = False):
    self._tokenizer = tokenizer
    self._case_sensitive = case_sensitive
    self.tokens = frozenset(self._normalise(t) for t in tokens)
    self._cache: dict[int, bool] = {}

  def _normalise(self, text: str) -> str:
    text = text.strip()
    return text if self._case_sensitive else text.lower()

  def decode(self, token_id: int) -> str:
    return self._tokenizer.decode([int(token_id)], skip_special_tokens=False)

  def is_uninformative(self, token_id: int) -> bool:
    token_id = int(token_id)
    if token_id not in self._cache:
      self._cache[token_id] = self._normalise(self.decode(token_id)) in self.tokens
    return self._cache[token_id]

  def __call__(self, token_ids: np.ndarray) -> np.ndarray:
    """token_ids: [...] int -> [...] bool."""
    token_ids = np.asarray(token_ids)
    flat = [self.is_uninformative(t) for t in token_ids.reshape(-1)]
    return np.asarray(flat, bool).reshape(token_ids.shape)


def response_log_psi_from_layer(decoder_layer, hidden: jax.Array, cos: jax.Array,
                                sin: jax.Array, key_mask: jax.Array, response_mask: jax.Array,
                                *, sigma: float = DEFAULT_SIGMA, query_chunk: int = 128
                                ) -> jax.Array:
  """log psi of the response tokens from one decoder layer's input, chunked over queries.

  Recomputes the layer's attention probabilities (its input_layernorm, q/k projections
  with biases, 3-D rotary, grouped-query heads, the float32 softmax of
  `dprl.models.layers.attention`) for the response queries only, `query_chunk` at a
  time, and accumulates each chunk's share of `sum_{i >= j} (log sigma + log A[i, j])`:
  the largest live array is the chunk's scores/probabilities [B, H, chunk, T] instead of
  the layer's [B, H, T, T]. Queries are independent rows of the softmax, so chunking is
  exact (only the order of the float32 sum over i changes).

  Args:
    decoder_layer: the `DecoderLayer` read (`TextDecoder.layer(L)`).
    hidden: [B, T, D] the residual stream entering it, T = Tp + N (`[prompt | response]`).
    cos, sin: [B, T, Dh] the rotary of the sequence's (3-D mrope) positions.
    key_mask: [B, T] bool, real tokens (the model's attention mask).
    response_mask: [B, N] bool, real response tokens (the last N positions).
    sigma: the paper's scale.
    query_chunk: response queries per step.

  Returns:
    [B, N] float32 log psi; -inf where response_mask is False.
  """
  b, t, _ = hidden.shape
  n = response_mask.shape[1]
  tp = t - n
  chunk = max(1, min(query_chunk, n))
  num_chunks = -(-n // chunk)
  response_mask = response_mask.astype(bool)
  key_mask = key_mask.astype(bool)
  q, k = decoder_layer.self_attn.query_key(decoder_layer.input_layernorm(hidden), cos, sin)
  # Only response queries are needed; pad them to whole chunks (padding rows are invalid
  # queries and add nothing). q: [C, B, chunk, H, Dh], chunks leading for the scan.
  pad = num_chunks * chunk - n
  q = jnp.pad(q[:, tp:], ((0, 0), (0, pad), (0, 0), (0, 0)))
  q = jnp.moveaxis(q.reshape(b, num_chunks, chunk, *q.shape[2:]), 1, 0)
  query_valid = jnp.pad(response_mask, ((0, 0), (0, pad)))
  query_valid = jnp.moveaxis(query_valid.reshape(b, num_chunks, chunk), 1, 0)  # [C, B, chunk]
  rows = jnp.arange(num_chunks * chunk).reshape(num_chunks, chunk)  # response index i
  key_slot = jnp.arange(t)
  log_sigma = jnp.log(jnp.float32(sigma))

  def add_chunk(total, xs):
    q_chunk, valid_query, i = xs  # [B, chunk, H, Dh], [B, chunk], [chunk]
    # The model's mask for these query slots: causal and the real keys.
    mask = (key_slot[None, None, :] <= (tp + i)[None, :, None]) & key_mask[:, None, :]
    probs = layers.attention_probs(q_chunk, k, mask)  # [B, H, chunk, T]
    block = probs.mean(axis=1)[:, :, tp:]  # [B, chunk, N]: heads averaged, response keys
    valid = ((i[:, None] >= jnp.arange(n)[None, :])[None]
             & valid_query[:, :, None] & response_mask[:, None, :])
    # log(0) = -inf is kept: a zero factor makes psi exactly 0.
    terms = jnp.where(valid, log_sigma + jnp.log(block), 0.0)
    return total + terms.sum(axis=1), None

  total, _ = jax.lax.scan(add_chunk, jnp.zeros((b, n), jnp.float32), (q, query_valid, rows))
  return jnp.where(response_mask, total, -jnp.inf)


def _log_psi(state, prompt_ids, prompt_mask, response_ids, response_mask, pixel_values,
             image_grid_thw, *, graphdef, layer: int, sigma: float, query_chunk: int | None):
  model = nnx.merge(graphdef, state)
  cfg = model.config
  input_ids = jnp.concatenate([prompt_ids, response_ids.astype(prompt_ids.dtype)], axis=1)
  attention_mask = jnp.concatenate([prompt_mask.astype(jnp.int32),
                                    response_mask.astype(jnp.int32)], axis=1)
  if query_chunk is None:
    # The reference path: the layer's whole [B, H, T, T] probabilities from the model.
    # logits_to_keep=1: the logits are unused, and full ones would be [B, T, V].
    out = model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw, attention_layers=(layer,), logits_to_keep=1)
    tp = prompt_ids.shape[1]
    block = out.attentions[layer][:, :, tp:, tp:].mean(axis=1)  # [B, N, N]
    return log_attention_confidence(block, response_mask.astype(bool), sigma)
  # The positions once, given to the model too, so the recomputed layer sees the rotary
  # the model's own layer L would.
  position_ids, _ = rope.mrope_position_ids(
      input_ids, attention_mask, image_grid_thw, image_token_id=cfg.image_token_id,
      spatial_merge_size=cfg.vision.spatial_merge_size)
  out = model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
              image_grid_thw=image_grid_thw, position_ids=position_ids, stop_at_layer=layer,
              query_chunk=query_chunk)
  cos, sin = rope.mrope_cos_sin(position_ids, cfg.text.head_dim, cfg.text.rope_theta,
                                cfg.text.mrope_section, cfg.dtype)
  return response_log_psi_from_layer(
      model.model.layer(layer), out.layer_input, cos, sin, attention_mask, response_mask,
      sigma=sigma, query_chunk=query_chunk)


@functools.lru_cache(maxsize=16)
def jitted_log_psi(graphdef, layer: int, sigma: float, query_chunk: int | None):
  """The jitted teacher-forced pass of `response_log_psi` (layer resolved, >= 0):

      f(state, prompt_ids [B, Tp], prompt_mask [B, Tp], response_ids [B, N],
        response_mask [B, N], pixel_values [P, C] | None, image_grid_thw [I, 3] | None)
      -> log psi [B, N] float32

  One per setting (cached), so `.lower(...).compile().memory_analysis()` measures what
  runs (benchmarks/ace_memory.py).
  """
  return jax.jit(functools.partial(_log_psi, graphdef=graphdef, layer=layer, sigma=sigma,
                                   query_chunk=query_chunk))


def resolve_layer(layer: int, num_layers: int) -> int:
  """A Python-style index (-1: the final layer) as a layer number, checked."""
  if not -num_layers <= layer < num_layers:
    raise ValueError(f"ace layer {layer} out of range for a decoder of {num_layers} layers")
  return layer % num_layers


def response_log_psi(model, prompt_ids, prompt_mask, response_ids, response_mask,
                     pixel_values=None, image_grid_thw=None, *, layer: int = -1,
                     sigma: float = DEFAULT_SIGMA, query_chunk: int | None = 128
                     ) -> np.ndarray:
  """Teacher-forces responses and returns log psi of each response token.

  Args:
    model: a Qwen2.5-VL module.
    prompt_ids, prompt_mask: [B, Tp] left-padded prompts (the rollouts' prompts).
    response_ids, response_mask: [B, N] responses, right-padded.
    pixel_values, image_grid_thw: the prompts' images, processor format, or None.
    layer: the decoder layer whose attention is read (-1: the final layer).
    sigma: the paper's scale.
    query_chunk: response queries per step of the recomputed layer (bounds memory to
      [B, H, query_chunk, T]); None reads the layer's whole [B, H, T, T] probabilities
      from the model instead (the reference path, for tests).

  Returns:
    [B, N] float32 log psi; -inf at padding.
  """
  if query_chunk is not None and query_chunk < 1:
    raise ValueError(f"query_chunk must be >= 1 or None, got {query_chunk}")
  prompt_ids, response_ids = np.asarray(prompt_ids), np.asarray(response_ids)
  if prompt_ids.ndim != 2 or response_ids.ndim != 2 or len(prompt_ids) != len(response_ids):
    raise ValueError(f"prompt_ids and response_ids must be [B, T] with one B, got "
                     f"{prompt_ids.shape} and {response_ids.shape}")
  layer = resolve_layer(layer, model.config.text.num_hidden_layers)
  graphdef, state = nnx.split(model)
  if pixel_values is not None:
    pixel_values, image_grid_thw = pad_patches(
        np.asarray(pixel_values, np.float32), np.asarray(image_grid_thw, np.int32),
        model.config.vision.spatial_merge_size)
  log_psi = jitted_log_psi(graphdef, layer, float(sigma), query_chunk)(
      state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
      jnp.asarray(response_ids, jnp.int32), jnp.asarray(response_mask, jnp.int32),
      pixel_values, image_grid_thw)
  return np.asarray(log_psi)


def pad_patches(pixel_values: np.ndarray, image_grid_thw: np.ndarray, merge: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Pads the patches to a power of two with a dummy image no token refers to.

  As the sampler does: image sizes vary from record to record, and without a patch
  bucket every new total would compile the forward pass again. The dummy image's
  features are computed and never scattered (the k-th image token takes the k-th
  feature row), and vision attention stays within each image, so nothing else changes.
  pixel_values: [N, D] -> [bucket(N), D]; image_grid_thw: [I, 3] -> [I(+1), 3].
  """
  extra = bucket(pixel_values.shape[0], 64) - pixel_values.shape[0]
  if extra == 0:
    return pixel_values, image_grid_thw
  dummy = np.zeros((extra, pixel_values.shape[1]), pixel_values.dtype)
  grid = np.array([[1, merge, extra // merge]], image_grid_thw.dtype)
  return np.concatenate([pixel_values, dummy]), np.concatenate([image_grid_thw, grid])


def pad_responses(responses: Sequence[Sequence[int]], pad_id: int, length: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists: ids [B, N], mask [B, N] (N = `length` or the longest)."""
  longest = max((len(r) for r in responses), default=0)
  length = max(1, longest) if length is None else length
  if longest > length:
    raise ValueError(f"a response has {longest} tokens, more than length {length}")
  ids = np.full((len(responses), length), pad_id, np.int32)
  mask = np.zeros((len(responses), length), np.int32)
  for row, tokens in enumerate(responses):
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask


# ---------------------------------------------------------------------------------------
# Records and their sampled responses
# ---------------------------------------------------------------------------------------

# Which of a record's K sampled responses ACE teacher-forces: (correct [K], lengths [K])
# -> index. The paper says "a sampled reasoning trace" without saying which.
RESPONSE_PICKERS = Registry("ACE response picker")


@RESPONSE_PICKERS.register("first")
def first_response(correct: Sequence[bool], lengths: Sequence[int]) -> int:
  del correct, lengths
  return 0


@RESPONSE_PICKERS.register("first_correct")
def first_correct_response(correct: Sequence[bool], lengths: Sequence[int]) -> int:
  """The first correct response (a trace that reasoned to the answer), else the first."""
  del lengths
  return next((k for k, c in enumerate(correct) if c), 0)


@RESPONSE_PICKERS.register("longest")
def longest_response(correct: Sequence[bool], lengths: Sequence[int]) -> int:
  del correct
  return int(np.argmax(lengths))


@dataclasses.dataclass(frozen=True)
class AceConfig:
  """ACE settings (configs/rap.py's `ace` block).

  Attributes:
    layer: decoder layer read (-1: the final layer, as the paper).
    sigma: the scale in psi_j = prod (sigma * A[i, j]).
    response: a `RESPONSE_PICKERS` name.
    uninformative: token strings counted as uninformative (see `DEFAULT_UNINFORMATIVE`).
    batch_size: rows per forward pass.
    query_chunk: queries attended at a time, in the layers before the one read and in
      its recomputed probabilities: bounds them to [batch_size, H, query_chunk, T].
  """

  layer: int = -1
  sigma: float = DEFAULT_SIGMA
  response: str = "first"
  uninformative: tuple[str, ...] = DEFAULT_UNINFORMATIVE
  batch_size: int = 1
  query_chunk: int = 128

  def __post_init__(self):
    object.__setattr__(self, "uninformative", tuple(self.uninformative))
    RESPONSE_PICKERS[self.response]  # pylint: disable=pointless-statement  # checks the name
    if self.sigma <= 0:
      raise ValueError(f"ace sigma must be > 0, got {self.sigma}")
    if self.batch_size < 1:
      raise ValueError(f"ace batch_size must be >= 1, got {self.batch_size}")
    if self.query_chunk < 1:
      raise ValueError(f"ace query_chunk must be >= 1, got {self.query_chunk}")


class AceScore(NamedTuple):
  """One response's ACE measurement."""

  log_max_psi: float  # over uninformative tokens; -inf if there are none
  token: str  # the decoded token attaining it ("" if none)
  position: int  # its index in the response (-1 if none)


def response_token_ids(tokenizer, response: str, ended: bool, eos_id: int) -> list[int]:
  """Ids for a decoded response, for rollouts stored without their sampled ids.

  A fallback: the text (special tokens removed) is encoded again and the end-of-turn
  token put back when the response stopped on it. Byte-level BPE may segment the text
  otherwise than the sampler did (a word spelt out piece by piece comes back as one
  token), and special tokens the model sampled are gone, so ACE then measures another
  sequence; `ItemResult.response_token_ids` are the ids to use.
  """
  ids = tokenizer.backend_tokenizer.encode(response, add_special_tokens=False).ids
  return ids + [eos_id] if ended else ids


def end_before_vision_tokens(token_ids: Sequence[int], vision_token_ids: Iterable[int]
                             ) -> list[int]:
  """The response up to, not including, its first image/video placeholder id.

  A sampled placeholder cannot be teacher-forced as the sampler fed it: in `input_ids`
  the model reads every placeholder as the slot of the next image feature, counted over
  the batch, which would shift other rows' image features (see `dprl.rl.logprobs`).
  """
  vision = set(int(t) for t in vision_token_ids)
  ids = [int(t) for t in token_ids]
  return next((ids[:k] for k, t in enumerate(ids) if t in vision), ids)


def score_responses(model, tokenizer, records: Sequence[Record],
                    responses: Sequence[Sequence[int]], *,
                    pipeline_config: pipeline_lib.PipelineConfig,
                    config: AceConfig = AceConfig(), matcher: TokenMatcher | None = None
                    ) -> list[AceScore]:
  """ACE of one sampled response per record, prompted as the rollouts were.

  Args:
    model, tokenizer: the base model and its tokenizer.
    records: the prompts' records (all must make valid prompts).
    responses: one response per record as the sampled token ids
      (`ItemResult.response_token_ids[k]`, the end token included when it stopped on
      one); teacher-forced as they are, up to a first vision placeholder
      (`end_before_vision_tokens`).
    pipeline_config: the prompt settings of the rollouts (template, pixel bounds).
    config: ACE settings.
    matcher: the uninformative-token matcher (default: from `config.uninformative`).

  Returns:
    One `AceScore` per record, in order; positions index the response's ids.
  """
  if len(records) != len(responses):
    raise ValueError(f"{len(records)} records and {len(responses)} responses: need one "
                     "response per record")
  matcher = matcher or TokenMatcher(tokenizer, config.uninformative)
  special = tokenizer_lib.SpecialTokenIds.from_tokenizer(tokenizer)
  vision = (model.config.image_token_id, model.config.video_token_id)
  report = pipeline_lib.BadRecordReport()
  to_example = pipeline_lib.RecordToExample(tokenizer, pipeline_config, report)
  patch_dim = 3 * pipeline_config.temporal_patch_size * pipeline_config.patch_size ** 2
  scores: list[AceScore] = []
  for start in range(0, len(records), config.batch_size):
    stop = min(start + config.batch_size, len(records))
    examples = [to_example.example(r) for r in records[start:stop]]
    tokens = [end_before_vision_tokens(responses[i], vision) for i in range(start, stop)]
    # Padding rows (copies of the last) keep one batch shape for jit.
    fill = config.batch_size - len(examples)
    batch = pipeline_lib.collate(examples + [examples[-1]] * fill, pad_id=special.pad,
                                 buckets=pipeline_config.buckets, patch_dim=patch_dim)
    response_ids, response_mask = pad_responses(
        tokens + [tokens[-1]] * fill, special.pad, bucket(max(len(t) for t in tokens)))
    has_images = batch["image_grid_thw"].shape[0] > 0
    log_psi = response_log_psi(
        model, batch["input_ids"], batch["attention_mask"], response_ids, response_mask,
        batch["pixel_values"] if has_images else None,
        batch["image_grid_thw"] if has_images else None, layer=config.layer,
        sigma=config.sigma, query_chunk=config.query_chunk)
    uninformative = matcher(response_ids) & response_mask.astype(bool)
    best, where = max_over(log_psi, uninformative)
    for row in range(len(examples)):
      position = int(where[row])
      token = matcher.decode(response_ids[row, position]) if position >= 0 else ""
      scores.append(AceScore(float(best[row]), token, position))
  return scores
