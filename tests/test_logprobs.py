"""Chunked teacher-forced log-probs against full-vocabulary log-softmax of the model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dprl.models import qwen2_5_vl
from dprl.models.config import get_preset
from dprl.rl.logprobs import logprobs_from_hidden, response_logprobs

PROMPT_LEN, RESPONSE_LEN = 14, 11


def _batch(cfg, seed=0, batch=3, images=True):
  """Left-padded prompts (one 4x4-patch image each, 4 image tokens) + responses."""
  rng = np.random.default_rng(seed)
  vocab = 250
  prompt_ids = rng.integers(0, vocab, (batch, PROMPT_LEN)).astype(np.int32)
  prompt_mask = np.ones((batch, PROMPT_LEN), np.int32)
  prompt_mask[0, :3] = 0
  prompt_ids[0, :3] = 0
  if images:
    prompt_ids[:, 5] = cfg.vision_start_token_id
    prompt_ids[:, 6:10] = cfg.image_token_id
    prompt_ids[:, 10] = cfg.vision_end_token_id
    pixel_values = rng.normal(size=(16 * batch, cfg.vision.patch_dim)).astype(np.float32)
    grid = np.tile(np.array([[1, 4, 4]], np.int32), (batch, 1))
  else:
    pixel_values = grid = None
  response_ids = rng.integers(0, vocab, (batch, RESPONSE_LEN)).astype(np.int32)
  response_mask = np.ones((batch, RESPONSE_LEN), np.int32)
  response_mask[1, 6:] = 0  # EOS at position 5, padding after
  return prompt_ids, prompt_mask, response_ids, response_mask, pixel_values, grid


def _reference(model, prompt_ids, prompt_mask, response_ids, response_mask, pv, grid,
               temperature):
  ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
  logits = model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid).logits
  log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
  log_probs = log_probs[:, PROMPT_LEN - 1:PROMPT_LEN - 1 + RESPONSE_LEN]
  logp = jnp.take_along_axis(log_probs, response_ids[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
  return logp, entropy


@pytest.fixture(scope="module")
def model():
  return qwen2_5_vl.init("tiny", seed=1)


# Chunks of 1, a size that leaves a ragged last chunk, and one larger than the response.
@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.0), (4, 0.7), (64, 1.0)])
def test_chunked_logprobs_and_entropy_match_full_log_softmax(model, chunk_size, temperature):
  inputs = _batch(model.config)
  graphdef, state = nnx.split(model)

  @jax.jit
  def chunked(state, *inputs):
    return response_logprobs(nnx.merge(graphdef, state), *inputs, temperature=temperature,
                             chunk_size=chunk_size)

  logp, entropy = chunked(state, *inputs)
  ref_logp, ref_entropy = jax.jit(lambda state, *inputs: _reference(
      nnx.merge(graphdef, state), *inputs, temperature))(state, *inputs)
  valid = inputs[3].astype(bool)
  assert logp.shape == entropy.shape == (3, RESPONSE_LEN)
  np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(ref_logp)[valid], atol=2e-5)
  np.testing.assert_allclose(np.asarray(entropy)[valid], np.asarray(ref_entropy)[valid],
                             atol=2e-5)


def test_gradient_matches_full_log_softmax(model):
  inputs = _batch(model.config, seed=2, images=False)
  graphdef, state = nnx.split(model)
  valid = jnp.asarray(inputs[3], bool)
  weights = jnp.asarray(np.random.default_rng(0).normal(size=valid.shape), jnp.float32)

  def objective(state, chunked):
    m = nnx.merge(graphdef, state)
    if chunked:
      logp, _ = response_logprobs(m, *inputs, chunk_size=3)
    else:
      logp, _ = _reference(m, *inputs, 1.0)
    return jnp.sum(jnp.where(valid, weights * logp, 0.0))

  got = jax.jit(jax.grad(lambda s: objective(s, True)))(state)
  ref = jax.jit(jax.grad(lambda s: objective(s, False)))(state)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)


def test_entropy_carries_no_gradient():
  hidden = jax.random.normal(jax.random.key(0), (2, 5, 8))
  weight = jax.random.normal(jax.random.key(1), (8, 16))
  targets = jnp.zeros((2, 5), jnp.int32)
  grad = jax.grad(lambda w: logprobs_from_hidden(lambda h: h @ w, hidden, targets,
                                                 chunk_size=2)[1].sum())(weight)
  assert float(jnp.abs(grad).max()) == 0.0


@pytest.mark.slow
def test_full_vocabulary_logits_are_never_materialised_for_the_batch():
  # A wide vocabulary makes the float32 logits dominate: [2, 256, 32768] is 67 MB for the
  # response alone, a chunk of 8 positions 2 MB. Compared with one chunk spanning the
  # whole response (the unchunked computation), chunking must save most of the logits'
  # memory, forward and backward (the attention matrices are the same in both).
  cfg = get_preset("tiny")
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=32768))
  graphdef, state = nnx.split(qwen2_5_vl.abstract(cfg))
  batch, prompt_len, response_len = 2, 16, 256
  args = (jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
          jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
          jax.ShapeDtypeStruct((batch, response_len), jnp.int32),
          jax.ShapeDtypeStruct((batch, response_len), jnp.int32))
  response_logits_bytes = batch * response_len * cfg.text.vocab_size * 4

  def temp_bytes(chunk_size, backward):
    def logprob_sum(state, *args):
      logp, _ = response_logprobs(nnx.merge(graphdef, state), *args, chunk_size=chunk_size)
      return logp.sum()
    fn = jax.grad(logprob_sum) if backward else logprob_sum
    return jax.jit(fn).lower(state, *args).compile().memory_analysis().temp_size_in_bytes

  for backward in (False, True):
    chunked, whole = temp_bytes(8, backward), temp_bytes(response_len, backward)
    assert whole - chunked > 0.6 * response_logits_bytes, (backward, chunked, whole)


def test_bad_arguments_are_named(model):
  prompt_ids, prompt_mask, response_ids, response_mask, _, _ = _batch(model.config,
                                                                      images=False)
  with pytest.raises(ValueError, match="rows"):
    response_logprobs(model, prompt_ids, prompt_mask, response_ids[:2], response_mask[:2])
  with pytest.raises(ValueError, match="chunk_size"):
    response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask,
                      chunk_size=0)
  with pytest.raises(ValueError, match="temperature"):
    response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask,
                      temperature=0.0)
