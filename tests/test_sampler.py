"""The sampler against transformers' generate and teacher-forced log-probabilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from dprl.models import qwen2_5_vl
from dprl.parallel.mesh import make_mesh
from dprl.sampling import generate, prompt_width
from dprl.sampling.processors import (draw_uniforms, first_argmax, inverse_cdf_sample, sample_tokens, top_k_filter,
                                      top_p_filter)
from hf_reference import IMAGE_TOKEN, make_hf_model, multimodal_batch

GRIDS = [[(1, 12, 10), (1, 4, 6)], [(1, 8, 8)], []]
TEXT_LENS = [2, 5, 9]


@pytest.fixture(scope="module")
def hf_model():
  return make_hf_model(seed=1)


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_hf"))
  hf_model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def model(checkpoint):
  return qwen2_5_vl.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def batch():
  return multimodal_batch(GRIDS, TEXT_LENS, seed=4)


def _hf_generate(hf_model, ids, mask, pv, thw, n):
  with torch.no_grad():
    out = hf_model.generate(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
        pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(thw),
        mm_token_type_ids=torch.from_numpy((ids == IMAGE_TOKEN).astype(np.int64)),
        max_new_tokens=n, do_sample=False, pad_token_id=0)
  return out[:, ids.shape[1]:].numpy()


def _hf_teacher_forced_logprobs(hf_model, ids, mask, pv, thw, tokens, token_mask, num_samples):
  """log softmax of transformers' logits at each sampled token, prompt + response in one pass."""
  g = num_samples
  # Expand prompts to samples; the images of prompt p are repeated for each of its samples.
  ids, mask = np.repeat(ids, g, 0), np.repeat(mask, g, 0)
  counts = [len(r) for r in GRIDS]
  grids, pvs, start = [], [], 0
  per_image = [int(np.prod(x)) for x in thw]
  offsets = np.concatenate([[0], np.cumsum(per_image)])
  img = 0
  for c in counts:
    rows = list(range(img, img + c))
    img += c
    for _ in range(g):
      for r in rows:
        grids.append(thw[r])
        pvs.append(pv[offsets[r]:offsets[r + 1]])
  full_ids = np.concatenate([ids, tokens], 1)
  full_mask = np.concatenate([mask, token_mask], 1)
  t_ids = torch.from_numpy(full_ids.astype(np.int64))
  t_mask = torch.from_numpy(full_mask.astype(np.int64))
  t_thw = torch.from_numpy(np.stack(grids))
  pos, _ = hf_model.model.get_rope_index(t_ids, mm_token_type_ids=(t_ids == IMAGE_TOKEN).int(),
                                         image_grid_thw=t_thw, attention_mask=t_mask)
  with torch.no_grad():
    logits = hf_model(input_ids=t_ids, attention_mask=t_mask, position_ids=pos,
                      pixel_values=torch.from_numpy(np.concatenate(pvs)), image_grid_thw=t_thw).logits
  logp = torch.log_softmax(logits.float(), -1).numpy()
  t = ids.shape[1]
  # The logits at position t-1+i predict response token i.
  pred = logp[:, t - 1:-1]
  return np.take_along_axis(pred, tokens[..., None].astype(np.int64), -1)[..., 0]


@pytest.mark.parametrize("unstack_layers", [True, False], ids=["layer_copies", "sliced_each_step"])
def test_greedy_equals_transformers_generate_multimodal_left_padded(model, hf_model, batch, unstack_layers):
  ids, mask, pv, thw = batch
  out = generate(model, ids, mask, pv, thw, max_new_tokens=12, temperature=0.0, unstack_layers=unstack_layers)
  np.testing.assert_array_equal(np.asarray(out.tokens), _hf_generate(hf_model, ids, mask, pv, thw, 12))
  assert np.asarray(out.lengths).tolist() == [12, 12, 12]


@pytest.mark.parametrize("num_samples", [1, 3])
def test_logprobs_equal_transformers_teacher_forced(model, hf_model, batch, num_samples):
  ids, mask, pv, thw = batch
  # The random tiny model can emit vision placeholder ids (288-291), which transformers would
  # take for image slots when teacher-forcing; use the first seed whose samples have none.
  for seed in range(50):
    out = generate(model, ids, mask, pv, thw, max_new_tokens=10, temperature=1.0, seed=seed,
                   num_samples=num_samples, eos_token_id=[3, 17, 42])
    tokens, lp, m = (np.asarray(x) for x in (out.tokens, out.logprobs, out.mask))
    if not np.isin(tokens, [288, 289, 290, 291]).any():
      break
  assert tokens.shape == (3 * num_samples, 10)
  ref = _hf_teacher_forced_logprobs(hf_model, ids, mask, pv, thw, tokens, m, num_samples)
  valid = m.astype(bool)
  np.testing.assert_allclose(lp[valid], ref[valid], atol=1e-4)
  assert np.all(lp[~valid] == 0)


def test_bfloat16_logprobs_within_stated_tolerance(checkpoint, hf_model, batch):
  """The bf16 path (weights, decode weights and KV cache in bf16) against float32
  transformers, teacher-forced on the tokens it sampled: no worse than 2x transformers'
  own bf16 error plus 0.02, as the bf16 forward test states it."""
  ids, mask, pv, thw = batch
  model16 = qwen2_5_vl.from_pretrained(checkpoint, dtype=jnp.bfloat16)
  for seed in range(50):  # a draw without vision placeholder ids, as above
    out = generate(model16, ids, mask, pv, thw, max_new_tokens=10, temperature=1.0, seed=seed, eos_token_id=3)
    tokens, lp, m = (np.asarray(x) for x in (out.tokens, out.logprobs, out.mask))
    if not np.isin(tokens, [288, 289, 290, 291]).any():
      break
  assert lp.dtype == np.float32 and np.isfinite(lp).all()
  hf16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
  ref32 = _hf_teacher_forced_logprobs(hf_model, ids, mask, pv, thw, tokens, m, 1)
  ref16 = _hf_teacher_forced_logprobs(hf16, ids, mask, pv, thw, tokens, m, 1)
  valid = m.astype(bool)
  err_ours, err_hf = np.abs(lp - ref32)[valid].max(), np.abs(ref16 - ref32)[valid].max()
  assert err_ours <= 2 * err_hf + 0.02, (err_ours, err_hf)


def test_prompt_width_keeps_the_pipelines_buckets_else_powers_of_two_and_half_steps():
  widths = [prompt_width(n) for n in (1, 9, 17, 24, 25, 34, 49, 65, 97, 200)]
  assert widths == [16, 16, 24, 24, 32, 48, 64, 96, 128, 256]
  assert prompt_width(34, (32, 40, 80)) == 40  # the smallest bucket that holds the prompts
  assert prompt_width(40, (32, 40, 80)) == 40
  assert prompt_width(81, (32, 40, 80)) == 96  # wider than every bucket: the default widths


def test_prompt_buckets_change_the_padding_not_the_samples(model, batch):
  ids, mask, pv, thw = batch  # 48 tokens wide: kept at 48 by default, padded to 56 here
  assert ids.shape[1] == 48
  kw = dict(max_new_tokens=6, temperature=0.0)
  default = generate(model, ids, mask, pv, thw, **kw)
  wide = generate(model, ids, mask, pv, thw, prompt_buckets=(40, 56, 80), **kw)
  np.testing.assert_array_equal(np.asarray(wide.tokens), np.asarray(default.tokens))
  np.testing.assert_allclose(np.asarray(wide.logprobs), np.asarray(default.logprobs), atol=1e-5)


def test_group_samples_share_one_prefill(model, batch):
  ids, mask, pv, thw = batch
  single = generate(model, ids, mask, pv, thw, max_new_tokens=6, temperature=0.0)
  group = generate(model, ids, mask, pv, thw, max_new_tokens=6, temperature=0.0, num_samples=4)
  np.testing.assert_array_equal(np.asarray(group.tokens), np.repeat(np.asarray(single.tokens), 4, 0))


def test_rows_stop_independently_at_eos(model, batch):
  ids, mask, pv, thw = batch
  greedy = np.asarray(generate(model, ids, mask, pv, thw, max_new_tokens=8, temperature=0.0).tokens)
  eos = int(greedy[0, 2])  # row 0 ends at its third token
  assert eos not in greedy[0, :2]
  out = generate(model, ids, mask, pv, thw, max_new_tokens=8, temperature=0.0, eos_token_id=eos, pad_token_id=5)
  tokens, lengths, m = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.mask)
  assert lengths[0] == 3 and tokens[0, 2] == eos and np.all(tokens[0, 3:] == 5)
  assert m[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
  for r in (1, 2):  # other rows run on, identical to the unstopped greedy output up to their own eos
    hit = np.flatnonzero(greedy[r] == eos)
    end = hit[0] + 1 if hit.size else 8
    assert lengths[r] == end
    np.testing.assert_array_equal(tokens[r, :end], greedy[r, :end])


def test_one_token_and_every_row_ending_before_the_last_column(model, batch):
  # The last column is drawn after the decode loop: with one new token the loop runs no
  # step, and when every row has ended the draw after it must only write padding.
  ids, mask, pv, thw = batch
  greedy = generate(model, ids, mask, pv, thw, max_new_tokens=8, temperature=0.0)
  tokens = np.asarray(greedy.tokens)
  one = generate(model, ids, mask, pv, thw, max_new_tokens=1, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(one.tokens), tokens[:, :1])
  np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(greedy.logprobs)[:, :1], atol=1e-5)
  assert np.asarray(one.lengths).tolist() == [1, 1, 1]
  eos = sorted(set(tokens[:, 1].tolist()))  # every row ends by its second token
  out = generate(model, ids, mask, pv, thw, max_new_tokens=8, temperature=0.0, eos_token_id=eos, pad_token_id=7)
  ends = [int(np.flatnonzero(np.isin(row, eos))[0]) + 1 for row in tokens]
  assert np.asarray(out.lengths).tolist() == ends
  for r, end in enumerate(ends):
    np.testing.assert_array_equal(np.asarray(out.tokens)[r, :end], tokens[r, :end])
    assert np.all(np.asarray(out.tokens)[r, end:] == 7) and np.all(np.asarray(out.logprobs)[r, end:] == 0)


def test_generate_reads_the_models_current_parameters(model, batch):
  # generate hands the module itself to jit, so a parameter changed in place (as a
  # training step's update does) is what the next call samples with.
  ids, mask, pv, thw = batch
  before = np.asarray(generate(model, ids, mask, pv, thw, max_new_tokens=6, temperature=0.0).tokens)
  head = model.model.embed_tokens.embedding if model.lm_head is None else model.lm_head
  saved = head[...]
  try:
    head[...] = -saved  # negated logits: another greedy token
    after = np.asarray(generate(model, ids, mask, pv, thw, max_new_tokens=6, temperature=0.0).tokens)
  finally:
    head[...] = saved
  assert not np.array_equal(after, before)
  again = np.asarray(generate(model, ids, mask, pv, thw, max_new_tokens=6, temperature=0.0).tokens)
  np.testing.assert_array_equal(again, before)


def test_same_seed_same_output_and_seed_matters(model, batch):
  ids, mask, pv, thw = batch
  a = generate(model, ids, mask, pv, thw, max_new_tokens=8, seed=3)
  b = generate(model, ids, mask, pv, thw, max_new_tokens=8, seed=3)
  c = generate(model, ids, mask, pv, thw, max_new_tokens=8, seed=4)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def _empirical(logits, n, **kw):
  uniforms = draw_uniforms(jax.random.key(0), (n, 1))
  tokens, _ = jax.vmap(lambda u: sample_tokens(u, logits[None], **kw))(uniforms)
  return np.bincount(np.asarray(tokens)[:, 0], minlength=logits.shape[0]) / n


def test_top_k_and_top_p_sample_the_truncated_distribution():
  logits = jnp.log(jnp.array([0.35, 0.25, 0.15, 0.1, 0.08, 0.07]))
  n = 40_000
  # top-k=3: renormalised over the three most likely tokens.
  freq = _empirical(logits, n, temperature=1.0, top_k=3, top_p=1.0)
  expected = np.array([0.35, 0.25, 0.15, 0, 0, 0]) / 0.75
  assert np.all(freq[3:] == 0)
  np.testing.assert_allclose(freq, expected, atol=0.01)  # ~4 standard errors
  # top-p=0.7: 0.35 + 0.25 = 0.6 < 0.7, so the third token is needed; the fourth is not.
  freq = _empirical(logits, n, temperature=1.0, top_k=0, top_p=0.7)
  assert np.all(freq[3:] == 0)
  np.testing.assert_allclose(freq, expected, atol=0.01)
  # temperature 0.5 sharpens: p ~ p^2.
  freq = _empirical(logits, n, temperature=0.5, top_k=0, top_p=1.0)
  sq = np.exp(np.asarray(logits) * 2)
  np.testing.assert_allclose(freq, sq / sq.sum(), atol=0.01)


@pytest.mark.parametrize("vocab", [5, 300, 4099])
def test_top_k_and_top_p_filters_keep_what_a_sort_keeps(vocab):
  # Reference: NumPy's sort, float64. Logits rounded to 0.5 so that many tie; some -inf
  # (a top-k before a top-p leaves them), some negative zeros.
  rng = np.random.default_rng(vocab)
  logits = np.round(rng.standard_normal((40, vocab)) * 4) / 2
  logits[rng.random(logits.shape) < 0.05] = -np.inf
  logits[:, 0] = np.where(logits[:, 0] == 0, -0.0, logits[:, 0])
  logits[:, 1] = np.maximum(logits[:, 1], 0)  # every row keeps a finite logit
  logits = logits.astype(np.float32)
  desc = -np.sort(-logits.astype(np.float64), axis=1)
  for k in (1, 3, vocab):
    kept = np.asarray(top_k_filter(jnp.asarray(logits), k)) > -np.inf  # -inf logits stay -inf
    np.testing.assert_array_equal(kept, (logits >= desc[:, k - 1:k]) & (logits > -np.inf))
  probs = np.exp(desc - desc[:, :1])
  probs /= probs.sum(1, keepdims=True)
  mass_before = np.cumsum(probs, 1) - probs
  for p in (0.3, 0.75, 0.95):
    # float32 sums may fall either side of p where a row's cumulative mass is within
    # 2e-6 of it; the other rows must keep exactly what the sort keeps.
    clear = np.min(np.abs(mass_before - p), axis=1) > 2e-6
    assert clear.mean() > 0.75
    threshold = np.min(np.where(mass_before < p, desc, np.inf), axis=1, keepdims=True)
    kept = np.asarray(top_p_filter(jnp.asarray(logits), p)) > -np.inf
    np.testing.assert_array_equal(kept[clear], (logits >= threshold)[clear])
    assert np.all(kept.sum(1) >= 1)


def test_first_argmax_equals_numpys_argmax_with_ties():
  rng = np.random.default_rng(0)
  x = np.round(rng.standard_normal((50, 37)) * 2) / 2  # many ties, at the maximum too
  x[rng.random(x.shape) < 0.1] = -np.inf
  x[3] = -np.inf  # a row of -inf: index 0, as argmax
  x = x.astype(np.float32)
  got = np.asarray(jax.jit(lambda a: first_argmax(a, a.max(-1, keepdims=True)))(x))
  np.testing.assert_array_equal(got, np.argmax(x, -1))


@pytest.mark.parametrize("vocab", [1, 7, 300, 1031])  # blocks of 1, 4, 32, 64 tokens; ragged last block
def test_inverse_cdf_sample_equals_a_float64_search_of_the_flat_cdf(vocab):
  rng = np.random.default_rng(vocab)
  weights = rng.gamma(0.3, size=(6, vocab)).astype(np.float32)
  weights[:, rng.random(vocab) < 0.3] = 0  # zero-weight tokens, as top-k/top-p leave them
  weights[:, rng.integers(vocab)] = 1.0  # every row keeps some mass
  uniforms = np.asarray(draw_uniforms(jax.random.key(vocab), (500, 6)))
  tokens = np.asarray(jax.jit(jax.vmap(inverse_cdf_sample, in_axes=(0, None)))(uniforms, weights))
  cdf = np.cumsum(weights.astype(np.float64), axis=1)
  cdf /= cdf[:, -1:]
  expected = np.stack([np.searchsorted(cdf[r], uniforms[:, r], side="left") for r in range(6)], 1)
  # float32 sums round differently from float64 ones: a draw within 1e-5 of a token
  # boundary may land on either side; away from the boundaries the tokens are the same.
  gap = np.min(np.abs(cdf[None, :, :] - uniforms[:, :, None]), axis=2)
  clear = gap > 1e-5
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(tokens[clear], expected[clear])
  assert np.all(np.take_along_axis(np.broadcast_to(weights, (500, 6, vocab)), tokens[..., None], 2) > 0)


def test_sharded_greedy_equals_single_device(model, batch):
  ids, mask, pv, thw = batch
  ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])  # 4 rows for data=2
  per_row = [int(np.prod(x)) for x in thw]
  pv = np.concatenate([pv, pv[:per_row[0] + per_row[1]]])
  thw = np.concatenate([thw, thw[:2]])
  mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
  single = generate(model, ids, mask, pv, thw, max_new_tokens=8, temperature=0.0)
  from flax import nnx
  from dprl.models.sharding import state_shardings
  graphdef, state = nnx.split(model)
  sharded_model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
  sharded = generate(sharded_model, ids, mask, pv, thw, max_new_tokens=8, temperature=0.0, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
