"""ACE: the log-space attention confidence against a NumPy transcription of the paper's
product, its stability on long responses, the uninformative-token matcher, and the
teacher-forced read-out from a tiny model."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dprl.curation import attention_confidence as ace
from dprl.data import pipeline as pipeline_lib
from dprl.data import synthetic
from dprl.data import templates
from dprl.data import tokenizer as tok_lib
from dprl.evaluation import rollout
from dprl.models import qwen2_5_vl


def reference_psi(attention: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
  """psi_j = prod_{i >= j, i valid} sigma * A[i, j], as written in the paper (float64)."""
  n = attention.shape[-1]
  psi = np.zeros(n)
  for j in range(n):
    if not mask[j]:
      continue
    product = 1.0
    for i in range(j, n):
      if mask[i]:
        product *= sigma * attention[i, j]
    psi[j] = product
  return psi


def random_attention(rng, n: int, prompt: int = 5) -> np.ndarray:
  """[n, n] response block of causal softmax rows over prompt + response keys."""
  scores = rng.normal(size=(n, prompt + n)) * 2.0
  causal = np.arange(prompt + n)[None, :] <= prompt + np.arange(n)[:, None]
  scores = np.where(causal, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return probs[:, prompt:]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sigma", [2.0, 1.0, 7.5])
def test_log_psi_matches_the_numpy_product_on_random_attention(seed, sigma):
  rng = np.random.default_rng(seed)
  n = 9
  attention = random_attention(rng, n)
  mask = np.ones(n, bool)
  mask[rng.integers(6, n + 1):] = False  # right padding
  got = np.asarray(ace.log_attention_confidence(attention, mask, sigma))
  want = reference_psi(attention, mask, sigma)
  np.testing.assert_allclose(np.exp(got[mask]), want[mask], rtol=1e-4)
  assert np.all(np.isneginf(got[~mask]))


def test_log_psi_is_batched_over_leading_axes():
  rng = np.random.default_rng(0)
  attention = np.stack([random_attention(rng, 6) for _ in range(3)])
  mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], bool)
  got = np.asarray(ace.log_attention_confidence(attention, mask, 2.0))
  for row in range(3):
    want = np.asarray(ace.log_attention_confidence(attention[row], mask[row], 2.0))
    np.testing.assert_array_equal(got[row], want)


def test_hand_computed_two_token_case():
  # psi_0 = (2 * 0.5) * (2 * 0.25) = 0.5; psi_1 = 2 * 0.75 = 1.5.
  attention = np.array([[0.5, 0.0], [0.25, 0.75]])
  got = np.exp(np.asarray(ace.log_attention_confidence(attention, np.array([True, True]))))
  np.testing.assert_allclose(got, [0.5, 1.5], rtol=1e-6)


def test_long_response_stays_finite_where_the_direct_product_underflows():
  # Uniform causal attention within the response, A[i, j] = 1 / (i + 1): closed form
  # log psi_j = (n - j) log 2 - (lgamma(n + 1) - lgamma(j + 1)).
  n = 3000
  i = np.arange(n)[:, None]
  attention = np.where(np.arange(n)[None, :] <= i, 1.0 / (i + 1), 0.0).astype(np.float32)
  got = np.asarray(ace.log_attention_confidence(attention, np.ones(n, bool), 2.0))
  want = np.array([(n - j) * math.log(2.0) - (math.lgamma(n + 1) - math.lgamma(j + 1))
                   for j in range(n)])
  assert np.prod(2.0 * attention[:, 0]) == 0.0  # the product itself underflows float64
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert got[0] < -10000  # far below anything exp() can represent


def test_exact_zero_attention_gives_minus_infinity_and_padding_too():
  attention = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
  got = np.asarray(ace.log_attention_confidence(attention, np.array([True, True, False])))
  assert np.isneginf(got[0])  # A[1, 0] = 0: psi_0 = 0 exactly
  assert got[1] == pytest.approx(math.log(2.0))
  assert np.isneginf(got[2])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 8), valid=st.integers(1, 8), seed=st.integers(0, 2**16),
       noise=hnp.arrays(np.float64, (8, 8), elements=st.floats(1e-6, 1.0)))
def test_padding_values_never_change_valid_tokens(n, valid, seed, noise):
  valid = min(valid, n)
  attention = random_attention(np.random.default_rng(seed), n)
  mask = np.arange(n) < valid
  changed = attention.copy()
  pad = ~(mask[:, None] & mask[None, :])
  changed[pad] = noise[:n, :n][pad]
  a = np.asarray(ace.log_attention_confidence(attention, mask))
  b = np.asarray(ace.log_attention_confidence(changed, mask))
  np.testing.assert_array_equal(a[mask], b[mask])
  # The last valid token has a single factor: psi = sigma * A[last, last].
  last = valid - 1
  assert a[last] == pytest.approx(math.log(2.0 * attention[last, last]), rel=1e-5, abs=1e-5)


def test_log_psi_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\[\.\.\., N, N\]"):
    ace.log_attention_confidence(np.ones((3, 4)), np.ones(3, bool))


def test_max_over_picks_the_largest_selected_and_reports_none():
  log_psi = np.array([[-1.0, -0.5, -3.0], [-1.0, -2.0, -3.0]])
  select = np.array([[True, False, True], [False, False, False]])
  best, where = ace.max_over(log_psi, select)
  assert best[0] == -1.0 and where[0] == 0
  assert np.isneginf(best[1]) and where[1] == -1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tok_lib.load_tokenizer(tok_lib.write_small_tokenizer(tmp_path_factory.mktemp("tok")))


def test_matcher_uses_decoded_strings_case_and_whitespace_insensitively(tokenizer):
  ids = tokenizer.encode(". a b\nA,<|im_end|>", add_special_tokens=False)
  flags = ace.TokenMatcher(tokenizer)(np.asarray(ids))
  decoded = [tokenizer.decode([i]) for i in ids]
  assert dict(zip(decoded, flags.tolist())) == {
      ".": True, " ": True, "a": True, "b": False, "\n": True, "A": True, ",": True,
      "<|im_end|>": False}
  custom = ace.TokenMatcher(tokenizer, ("b",), case_sensitive=True)
  assert custom(np.asarray(ids)).tolist() == [d == "b" for d in decoded]


def test_layer_index_is_checked():
  assert ace.resolve_layer(-1, 2) == 1
  with pytest.raises(ValueError, match="ace layer 2 out of range"):
    ace.resolve_layer(2, 2)


def test_unknown_response_picker_is_named():
  with pytest.raises(ValueError, match="unknown ACE response picker 'best'"):
    ace.AceConfig(response="best")
  assert ace.RESPONSE_PICKERS["first_correct"]([False, True, True], [3, 4, 5]) == 1
  assert ace.RESPONSE_PICKERS["first_correct"]([False, False], [3, 4]) == 0
  assert ace.RESPONSE_PICKERS["longest"]([False, False], [3, 4]) == 1


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
  return qwen2_5_vl.init(rollout.tiny_model_config_for(tokenizer), seed=3)


# None: the whole-layer read; 1, 2: ragged chunks; 5 = N; 128 > N (the default).
@pytest.mark.parametrize("query_chunk", [None, 1, 2, 5, 128])
def test_teacher_forced_read_out_matches_the_models_own_attention(tiny_model, query_chunk):
  rng = np.random.default_rng(0)
  # Two rows: a left-padded prompt, and a right-padded response.
  prompt_ids = rng.integers(20, 200, (2, 7)).astype(np.int32)
  prompt_mask = np.ones((2, 7), np.int32)
  prompt_mask[1, :3] = 0
  response_ids = rng.integers(20, 200, (2, 5)).astype(np.int32)
  response_mask = np.ones((2, 5), np.int32)
  response_mask[0, 3:] = 0
  # The final layer (the default, -1); `resolve_layer` covers other indices.
  got = ace.response_log_psi(tiny_model, prompt_ids, prompt_mask, response_ids, response_mask,
                             query_chunk=query_chunk)
  out = tiny_model(jnp.asarray(np.concatenate([prompt_ids, response_ids], 1)),
                   attention_mask=jnp.asarray(np.concatenate([prompt_mask, response_mask], 1)),
                   attention_layers=(1,), logits_to_keep=1)
  probs = np.asarray(out.attentions[1], np.float64).mean(1)[:, 7:, 7:]  # heads averaged
  for row in range(2):
    mask = response_mask[row].astype(bool)
    want = reference_psi(probs[row], mask, 2.0)
    np.testing.assert_allclose(np.exp(got[row][mask]), want[mask], rtol=1e-4)
    assert np.all(np.isneginf(got[row][~mask]))
  # A row's value does not depend on its batch mates or its padding.
  alone = ace.response_log_psi(tiny_model, prompt_ids[1:, 3:], prompt_mask[1:, 3:],
                               response_ids[1:], response_mask[1:], query_chunk=query_chunk)
  np.testing.assert_allclose(alone[0], got[1], rtol=1e-4)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """A tiny random transformers checkpoint (eager attention) and dprl's load of it."""
  from hf_reference import make_hf_model  # pylint: disable=g-import-not-at-top
  from transformers import Qwen2_5_VLForConditionalGeneration  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tiny_hf"))
  make_hf_model(seed=1).save_pretrained(path)
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
  return hf, qwen2_5_vl.from_pretrained(path)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("query_chunk", [1, 3])
def test_chunked_read_out_matches_transformers_eager_attention(hf_pair, layer, query_chunk):
  import torch  # pylint: disable=g-import-not-at-top
  from hf_reference import IMAGE_TOKEN, multimodal_batch  # pylint: disable=g-import-not-at-top
  hf, ours = hf_pair
  # Images of two sizes, left-padded prompts; the last 8 positions are the responses,
  # row 0's right-padded to 5 tokens (3 does not divide 8: a ragged last chunk).
  ids, mask, pv, thw = multimodal_batch([[(1, 12, 10), (1, 4, 6)], [(1, 16, 8)]], [10, 13])
  n = 8
  mask[0, -3:] = 0
  ids[0, -3:] = 0
  prompt_ids, response_ids = ids[:, :-n], ids[:, -n:]
  prompt_mask, response_mask = mask[:, :-n], mask[:, -n:]
  got = ace.response_log_psi(ours, prompt_ids, prompt_mask, response_ids, response_mask,
                             pv, thw, layer=layer, query_chunk=query_chunk)
  ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
  position_ids, _ = hf.model.get_rope_index(
      ids_t, mm_token_type_ids=(ids_t == IMAGE_TOKEN).int(), attention_mask=mask_t,
      image_grid_thw=torch.from_numpy(thw))
  with torch.no_grad():
    attentions = hf(input_ids=ids_t, attention_mask=mask_t, position_ids=position_ids,
                    pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(thw),
                    output_attentions=True).attentions
  probs = attentions[layer].double().numpy().mean(1)[:, -n:, -n:]  # [B, N, N] heads averaged
  for row in range(2):
    valid = response_mask[row].astype(bool)
    want = reference_psi(probs[row], valid, 2.0)
    np.testing.assert_allclose(np.exp(got[row][valid]), want[valid], rtol=1e-4)
    assert np.all(np.isneginf(got[row][~valid]))


def test_chunked_pass_holds_no_whole_layer_of_attention(tokenizer):
  # Compiled only (abstract weights): XLA's plan of the temporaries. One [B, H, T, T]
  # float32 array is 16 MiB here; all of the chunked pass's temporaries together (6.3 MiB:
  # a chunk's scores and probabilities, 2 MiB each, masks, activations) stay below half.
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cfg = rollout.tiny_model_config_for(tokenizer)
  graphdef, state = nnx.split(qwen2_5_vl.abstract(cfg))
  prompt, response = 64, 960
  ids = lambda n: jax.ShapeDtypeStruct((1, n), jnp.int32)
  args = (state, ids(prompt), ids(prompt), ids(response), ids(response), None, None)
  whole_layer = 4 * cfg.text.num_attention_heads * (prompt + response) ** 2

  def temp_bytes(query_chunk):
    fn = ace.jitted_log_psi(graphdef, cfg.text.num_hidden_layers - 1, 2.0, query_chunk)
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(None) >= whole_layer  # the reference path does hold it
  assert temp_bytes(128) < whole_layer / 2


def spelt_out(tokenizer, text: str) -> list[int]:
  """`text` as one id per character, as a sampler may produce it: for "<think>" that is 7
  ids where encoding the text again gives the single <think> token."""
  return [i for char in text for i in tokenizer.encode(char, add_special_tokens=False)]


def model_psi(model, example, response: list[int]) -> np.ndarray:
  """psi of `response` after `example`'s prompt: the NumPy product over the model's own
  final-layer attention, unbatched, without padding of any kind."""
  ids = np.concatenate([example["input_ids"], response])[None]
  out = model(jnp.asarray(ids), pixel_values=jnp.asarray(example["pixel_values"]),
              image_grid_thw=jnp.asarray(example["image_grid_thw"], jnp.int32),
              attention_layers=(1,), logits_to_keep=1)
  n = len(response)
  probs = np.asarray(out.attentions[1], np.float64)[0].mean(0)[-n:, -n:]
  return reference_psi(probs, np.ones(n, bool), 2.0)


def test_score_responses_teacher_forces_the_given_ids(tiny_model, tokenizer):
  records = synthetic.generate_split("count_color", "train", 3, seed=0)
  config = pipeline_lib.PipelineConfig(
      template=templates.TemplateConfig(names=("plain",)), min_pixels=28 * 28,
      max_pixels=56 * 56, max_prompt_length=512, shuffle=False)
  eos = tok_lib.SpecialTokenIds.from_tokenizer(tokenizer).eos
  # Response 0 as sampled: "<think>" spelt out, which encoding its text again would not
  # reproduce; response 1 stopped without an end token; response 2 has no uninformative
  # token.
  text = "<think>there are 3</think> \\boxed{3}"
  sampled = spelt_out(tokenizer, "<think>") + tokenizer.encode(
      text[len("<think>"):], add_special_tokens=False) + [eos]
  reencoded = ace.response_token_ids(tokenizer, text, True, eos)
  assert tokenizer.decode(sampled, skip_special_tokens=True) == text
  assert reencoded != sampled and len(reencoded) == len(sampled) - 6
  responses = [sampled, tokenizer.encode("so, the answer: 2", add_special_tokens=False),
               tokenizer.encode("xyz", add_special_tokens=False) + [eos]]
  scores = ace.score_responses(tiny_model, tokenizer, records, responses,
                               pipeline_config=config, config=ace.AceConfig(batch_size=2))
  assert len(scores) == 3
  for score in scores[:2]:
    assert score.token.strip().lower() in ace.DEFAULT_UNINFORMATIVE
    assert np.isfinite(score.log_max_psi) and score.position >= 0
  assert scores[2] == ace.AceScore(-math.inf, "", -1)  # "xyz" has no uninformative token

  # Record 0 against the model's own attention over exactly the sampled ids, unbatched and
  # without the patch padding (its 16 patches are padded to 64 inside `response_log_psi`).
  example = pipeline_lib.RecordToExample(tokenizer, config,
                                         pipeline_lib.BadRecordReport()).example(records[0])
  matcher = ace.TokenMatcher(tokenizer)
  uninformative = matcher(np.asarray(sampled))
  want = model_psi(tiny_model, example, sampled)[uninformative]
  assert scores[0].log_max_psi == pytest.approx(np.log(want.max()), rel=1e-4)
  assert scores[0].position == np.flatnonzero(uninformative)[np.argmax(want)]
  # ... and not over the re-encoded text, which gives another value.
  other = model_psi(tiny_model, example, reencoded)[matcher(np.asarray(reencoded))]
  assert not np.isclose(np.log(other.max()), scores[0].log_max_psi, rtol=1e-3)
  assert eos not in ace.response_token_ids(tokenizer, "ab", False, eos)
  assert ace.response_token_ids(tokenizer, "ab", True, eos)[-1] == eos


def test_a_sampled_vision_placeholder_ends_the_teacher_forced_response(tiny_model, tokenizer):
  image_pad = tiny_model.config.image_token_id
  vision = (image_pad, tiny_model.config.video_token_id)
  assert ace.end_before_vision_tokens([300, 301, image_pad, 302], vision) == [300, 301]
  assert ace.end_before_vision_tokens([300, 301], vision) == [300, 301]
  # In a batch, a placeholder in one row's response would take an image feature that
  # belongs to the next row; cut, both rows score as they do alone.
  records = synthetic.generate_split("count_color", "train", 2, seed=1)
  config = pipeline_lib.PipelineConfig(
      template=templates.TemplateConfig(names=("plain",)), min_pixels=28 * 28,
      max_pixels=56 * 56, max_prompt_length=512, shuffle=False)
  words = tokenizer.encode("a, b. c", add_special_tokens=False)
  together = ace.score_responses(tiny_model, tokenizer, records,
                                 [words + [image_pad] + words, words],
                                 pipeline_config=config, config=ace.AceConfig(batch_size=2))
  alone = [ace.score_responses(tiny_model, tokenizer, [r], [words], pipeline_config=config)[0]
           for r in records]
  for got, want in zip(together, alone):
    assert got.position == want.position
    assert got.log_max_psi == pytest.approx(want.log_max_psi, rel=1e-4)
