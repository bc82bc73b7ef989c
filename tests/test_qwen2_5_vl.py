"""Parity of dprl's Qwen2.5-VL with transformers on tiny random checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLForConditionalGeneration

from dprl.models import qwen2_5_vl, rope
from dprl.models.config import ConfigError, get_preset
from dprl.models.qwen2_5_vl import ImageTokenMismatchError
from dprl.models.weights import CheckpointError
from dprl.parallel.mesh import make_mesh
from hf_reference import IMAGE_TOKEN, hf_logits, make_hf_model, multimodal_batch

TOL = 1e-4
CASES = {
    "text_only_left_padded": ([[], []], [7, 3]),
    "one_image": ([[(1, 4, 4)]], [3]),
    # 12x10 patches = 6x5 merge units: windows of 4x4 units are ragged at the right and bottom.
    "images_of_different_sizes_left_padded": ([[(1, 12, 10), (1, 4, 6)], [(1, 16, 8)]], [2, 5]),
    # Sides multiples of the 8-patch window: every window full, no window or frame runs
    # across a block boundary, so the tower's attention takes its own-block path.
    "images_of_full_windows": ([[(1, 16, 16)], [(1, 8, 8), (1, 8, 8)]], [3, 6]),
}


@pytest.fixture(scope="module")
def hf_model():
  return make_hf_model(seed=0)


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_hf"))
  hf_model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def model(checkpoint):
  return qwen2_5_vl.from_pretrained(checkpoint, dtype=jnp.float32)


def _inputs(case, seed=0):
  grids, text_lens = CASES[case]
  ids, mask, pv, thw = multimodal_batch(grids, text_lens, seed=seed)
  has_images = any(grids)
  return ids, mask, (pv if has_images else None), (thw if has_images else None)


def _ours(model, ids, mask, pv, thw, **kw):
  j = lambda x: None if x is None else jnp.asarray(x)
  return model(j(ids), attention_mask=j(mask), pixel_values=j(pv), image_grid_thw=j(thw), **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_logits_match_transformers(model, hf_model, case):
  ids, mask, pv, thw = _inputs(case)
  ref = hf_logits(hf_model, ids, mask, pv, thw)
  got = np.asarray(_ours(model, ids, mask, pv, thw).logits)
  valid = mask.astype(bool)  # padded query rows are undefined in both
  assert got.shape == ref.shape
  np.testing.assert_allclose(got[valid], ref[valid], atol=TOL, rtol=0)


def test_forward_is_jittable_with_traced_images(model, hf_model):
  ids, mask, pv, thw = _inputs("images_of_different_sizes_left_padded")
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, mask, pv, thw):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw).logits

  got = np.asarray(forward(state, ids, mask, pv, thw))
  ref = hf_logits(hf_model, ids, mask, pv, thw)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], ref[valid], atol=TOL, rtol=0)


def test_mrope_positions_and_deltas_match_get_rope_index(hf_model):
  ids, mask, _, thw = _inputs("images_of_different_sizes_left_padded")
  ref_pos, ref_delta = hf_model.model.get_rope_index(
      torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy((ids == IMAGE_TOKEN).astype(np.int32)),
      image_grid_thw=torch.from_numpy(thw), attention_mask=torch.from_numpy(mask))
  pos, delta = rope.mrope_position_ids(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(thw),
                                       image_token_id=IMAGE_TOKEN, spatial_merge_size=2)
  valid = mask.astype(bool)
  np.testing.assert_array_equal(np.asarray(pos)[:, valid], ref_pos.numpy()[:, valid])
  np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy()[:, 0])


def test_last_layer_attention_probabilities_match_transformers_eager(checkpoint):
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
  ours = qwen2_5_vl.from_pretrained(checkpoint)
  ids, mask, pv, thw = _inputs("images_of_different_sizes_left_padded")
  mm_types = torch.from_numpy((ids == IMAGE_TOKEN).astype(np.int32))
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(thw),
             mm_token_type_ids=mm_types, output_attentions=True).attentions[-1].numpy()
  out = _ours(ours, ids, mask, pv, thw, attention_layers=(1,))
  got = np.asarray(out.attentions[1])  # [B, H, T, T]
  for b in range(ids.shape[0]):
    v = mask[b].astype(bool)
    np.testing.assert_allclose(got[b][:, v][:, :, v], ref[b][:, v][:, :, v], atol=1e-5)
  # The other layers' probabilities are not materialised, and the logits are unchanged.
  assert set(out.attentions) == {1}
  plain = np.asarray(_ours(ours, ids, mask, pv, thw).logits)
  np.testing.assert_allclose(np.asarray(out.logits), plain, atol=1e-5)


def _hf_hidden_states(hf_model, ids, mask, pv, thw):
  """transformers' hidden states: [0] the embeddings, [l] the input of layer l."""
  ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
  mm_types = (ids_t == IMAGE_TOKEN).int()
  position_ids, _ = hf_model.model.get_rope_index(
      ids_t, mm_token_type_ids=mm_types, attention_mask=mask_t,
      image_grid_thw=torch.from_numpy(thw))
  with torch.no_grad():
    out = hf_model(input_ids=ids_t, attention_mask=mask_t, position_ids=position_ids,
                   pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(thw),
                   output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("layer", [0, 1])
def test_stop_at_layer_returns_the_input_of_that_layer_as_transformers(model, hf_model, layer):
  ids, mask, pv, thw = _inputs("images_of_different_sizes_left_padded")
  ref = _hf_hidden_states(hf_model, ids, mask, pv, thw)[layer]
  out = _ours(model, ids, mask, pv, thw, stop_at_layer=layer)
  valid = mask.astype(bool)
  assert out.logits is None
  np.testing.assert_allclose(np.asarray(out.layer_input)[valid], ref[valid], atol=TOL, rtol=0)
  with pytest.raises(ValueError, match="stop_at_layer 2 out of range for 2 layers"):
    _ours(model, ids, mask, pv, thw, stop_at_layer=2)


def test_stop_at_layer_runs_no_later_layer(model):
  # Nothing from layer L on is in the computation: NaN weights there change nothing.
  ids, mask, pv, thw = _inputs("one_image")
  graphdef, state = nnx.split(model)
  poisoned = jax.tree.map(lambda a: a.at[1].set(jnp.nan), state["model"]["layers"])
  broken = nnx.merge(graphdef, {**state, "model": {**state["model"], "layers": poisoned}})
  got = np.asarray(_ours(broken, ids, mask, pv, thw, stop_at_layer=1).layer_input)
  want = np.asarray(_ours(model, ids, mask, pv, thw, stop_at_layer=1).layer_input)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("query_chunk", [1, 3, 8])
def test_query_chunked_attention_logits_match_transformers(model, hf_model, query_chunk):
  # 3 does not divide T, so the last chunk is padded; left padding and images as well.
  ids, mask, pv, thw = _inputs("images_of_different_sizes_left_padded")
  ref = hf_logits(hf_model, ids, mask, pv, thw)
  got = np.asarray(_ours(model, ids, mask, pv, thw, query_chunk=query_chunk).logits)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], ref[valid], atol=TOL, rtol=0)


def test_tied_embeddings_load_and_match(tmp_path):
  hf = make_hf_model(seed=3, tie_word_embeddings=True)
  hf.save_pretrained(tmp_path)
  ours = qwen2_5_vl.from_pretrained(str(tmp_path))
  assert ours.lm_head is None
  ids, mask, pv, thw = _inputs("one_image", seed=3)
  np.testing.assert_allclose(np.asarray(_ours(ours, ids, mask, pv, thw).logits),
                             hf_logits(hf, ids, mask, pv, thw), atol=TOL)


@pytest.mark.parametrize("max_shard_bytes", [None, 60_000])
def test_export_round_trip_transformers_loads_same_logits(model, hf_model, tmp_path, max_shard_bytes):
  kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
  qwen2_5_vl.save_pretrained(model, str(tmp_path), **kw)
  if max_shard_bytes:
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  ids, mask, pv, thw = _inputs("images_of_different_sizes_left_padded")
  np.testing.assert_allclose(hf_logits(reloaded, ids, mask, pv, thw), hf_logits(hf_model, ids, mask, pv, thw),
                             atol=1e-6)
  # ... and dprl reads its own sharded export back.
  again = qwen2_5_vl.from_pretrained(str(tmp_path))
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


def test_transformers_5_module_names_load(hf_model, tmp_path):
  """A checkpoint written with transformers 5.x in-memory names (model.language_model.*)."""
  from safetensors.torch import save_file
  sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}  # 5.x names
  assert any(k.startswith("model.language_model.") for k in sd)
  save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  hf_model.config.save_pretrained(tmp_path)
  ours = qwen2_5_vl.from_pretrained(str(tmp_path))
  ids, mask, pv, thw = _inputs("one_image")
  np.testing.assert_allclose(np.asarray(_ours(ours, ids, mask, pv, thw).logits),
                             hf_logits(hf_model, ids, mask, pv, thw), atol=TOL)


def test_bfloat16_within_stated_tolerance(checkpoint, hf_model):
  """bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%); rounding the weights and every
  activation compounds over the 3 vision and 2 text layers. We require our bf16 error
  against float32 transformers to be no worse than 2x transformers' own bf16 error plus
  0.02, and the argmax token to agree on >= 95% of positions."""
  ours = qwen2_5_vl.from_pretrained(checkpoint, dtype=jnp.bfloat16)
  assert ours.model.layers.mlp.gate_proj.kernel[...].dtype == jnp.bfloat16
  ids, mask, pv, thw = _inputs("images_of_different_sizes_left_padded")
  ref32 = hf_logits(hf_model, ids, mask, pv, thw)
  hf16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
  ref16 = hf_logits(hf16, ids, mask, pv.astype(np.float32), thw)
  out = _ours(ours, ids, mask, pv, thw)
  assert out.logits.dtype == jnp.float32
  got = np.asarray(out.logits)
  v = mask.astype(bool)
  err_ours = np.abs(got[v] - ref32[v]).max()
  err_hf = np.abs(ref16[v] - ref32[v]).max()
  assert np.isfinite(got).all()
  assert err_ours <= 2 * err_hf + 0.02, (err_ours, err_hf)
  assert (got[v].argmax(-1) == ref32[v].argmax(-1)).mean() >= 0.95


def test_sharded_load_on_2x2x2_mesh_equals_single_device(model, checkpoint):
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 virtual CPU devices"
  mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
  sharded = qwen2_5_vl.from_pretrained(checkpoint, mesh=mesh)
  kernel = sharded.model.layers.mlp.gate_proj.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  # Each device holds a quarter of the kernel, never the whole model.
  assert kernel.addressable_shards[0].data.shape == (2, 32, 64)
  ids, mask, pv, thw = _inputs("images_of_different_sizes_left_padded")
  graphdef, state = nnx.split(sharded)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  @jax.jit
  def forward(state, ids, mask, pv, thw):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw).logits

  got = forward(state, jax.device_put(ids, batch), jax.device_put(mask, batch), pv, thw)
  ref = np.asarray(_ours(model, ids, mask, pv, thw).logits)
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


# --- Bad input: errors name what is wrong ---------------------------------------------


def _copy(checkpoint, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(checkpoint, dst)
  return dst


def test_missing_tensor_is_named(checkpoint, tmp_path):
  from safetensors.numpy import load_file, save_file
  dst = _copy(checkpoint, tmp_path)
  tensors = load_file(str(dst / "model.safetensors"))
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
    qwen2_5_vl.from_pretrained(str(dst))


def test_wrong_shape_names_tensor_file_and_shapes(checkpoint, tmp_path):
  dst = _copy(checkpoint, tmp_path)
  cfg = json.load(open(dst / "config.json"))
  cfg["text_config"]["intermediate_size"] = 96  # the checkpoint has 128
  json.dump(cfg, open(dst / "config.json", "w"))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"):
    qwen2_5_vl.from_pretrained(str(dst))


def test_config_that_is_not_qwen2_5_vl_is_refused(checkpoint, tmp_path):
  dst = _copy(checkpoint, tmp_path)
  cfg = json.load(open(dst / "config.json"))
  cfg["model_type"] = "llama"
  json.dump(cfg, open(dst / "config.json", "w"))
  with pytest.raises(ConfigError, match=r"config\.json: model_type is 'llama', expected 'qwen2_5_vl'"):
    qwen2_5_vl.from_pretrained(str(dst))


def test_missing_checkpoint_folder_is_named(tmp_path):
  with pytest.raises(ConfigError, match="config.json: not found"):
    qwen2_5_vl.from_pretrained(str(tmp_path / "nope"))


def test_image_token_count_must_match_grid(model):
  ids, mask, pv, thw = _inputs("one_image")
  ids = ids.copy()
  ids[0, np.argmax(ids[0] == IMAGE_TOKEN)] = 5  # drop one image token
  with pytest.raises(ImageTokenMismatchError, match=r"3 image tokens .* needs 4"):
    _ours(model, ids, mask, pv, thw)


def test_presets_have_the_published_shapes():
  # Parameter counts of the released checkpoints (vision + decoder + head), to 1%.
  expected = {"qwen2_5_vl_3b": 3.75e9, "qwen2_5_vl_7b": 8.29e9}
  for name, count in expected.items():
    abstract = qwen2_5_vl.abstract(get_preset(name))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
    assert abs(n - count) / count < 0.01, (name, n)


def test_block_local_segment_attention_equals_dense():
  from dprl.models.layers import segment_attention
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 17, size=40)  # contiguous segments of at most 16
  segment = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths))
  n = int(lengths.sum())
  q, k, v = (jnp.asarray(rng.standard_normal((n, 2, 8)), jnp.float32) for _ in range(3))
  dense = segment_attention(q, k, v, segment, None)
  np.testing.assert_allclose(np.asarray(segment_attention(q, k, v, segment, 16)), np.asarray(dense), atol=1e-6)
  np.testing.assert_allclose(np.asarray(segment_attention(q, k, v, segment, 64)), np.asarray(dense), atol=1e-6)
  # Segments that never run across a 16-block boundary (the own-block path), the last
  # block part padding.
  lengths = [16, 8, 8, 4, 12, 16, 5, 3, 1]
  segment = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths))
  n = sum(lengths)
  q, k, v = (jnp.asarray(rng.standard_normal((n, 2, 8)), jnp.float32) for _ in range(3))
  dense = segment_attention(q, k, v, segment, None)
  for block in (16, 32):
    got = segment_attention(q, k, v, segment, block)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), atol=1e-6)


@pytest.mark.parametrize("case,bound", [("images_of_different_sizes_left_padded", 128),  # largest: 16 x 8
                                        ("images_of_full_windows", 256)])
def test_jitted_forward_with_a_frame_bound_matches_transformers(model, hf_model, case, bound):
  """Under jit the grid is traced; a static max_frame_patches makes the full-attention
  vision blocks block-local too."""
  ids, mask, pv, thw = _inputs(case)
  graphdef, state = nnx.split(model)
  assert qwen2_5_vl.frame_patch_bound(thw) == bound

  @jax.jit
  def forward(state, ids, mask, pv, thw):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw,
                                      max_frame_patches=bound).logits

  got = np.asarray(forward(state, ids, mask, pv, thw))
  ref = hf_logits(hf_model, ids, mask, pv, thw)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], ref[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("attention_layers", [(), (0,)])
def test_prefill_keys_values_then_cached_decode_steps_match_transformers(model, hf_model, attention_layers):
  # The sampler's path through the model: a prefill returning its keys/values (the scan,
  # split around a layer whose probabilities are asked for), a cache made of them, then one
  # token at a time through the unrolled layers; the logits equal transformers' forward of
  # the whole sequence at those positions.
  ids, mask, pv, thw = _inputs("images_of_different_sizes_left_padded")
  ref = hf_logits(hf_model, ids, mask, pv, thw)
  steps = 2  # the last two tokens (text in every row) go through the cache
  prompt_ids, prompt_mask = ids[:, :-steps], mask[:, :-steps]
  out = _ours(model, prompt_ids, prompt_mask, pv, thw, return_kv=True, attention_layers=attention_layers)
  np.testing.assert_allclose(np.asarray(out.logits)[:, -1], ref[:, -steps - 1], atol=TOL, rtol=0)
  t = prompt_ids.shape[1]
  cache = out.cache.extend(ids.shape[1])
  kv_heads, head_dim = model.config.text.num_key_value_heads, model.config.text.head_dim
  assert cache.k[0].shape == (ids.shape[0], kv_heads, head_dim, ids.shape[1])
  assert cache.v[0].shape == (ids.shape[0], kv_heads, ids.shape[1], head_dim)
  key_mask = jnp.asarray(np.concatenate([prompt_mask, np.zeros((ids.shape[0], steps), prompt_mask.dtype)], 1))
  next_pos = jnp.asarray(prompt_mask.sum(1)) + out.rope_deltas
  decode_weights = model.model.decode_weights(jnp.float32)
  for i in range(steps):
    key_mask = key_mask.at[:, t + i].set(1)
    pos = jnp.broadcast_to((next_pos + i)[None, :, None], (3, ids.shape[0], 1))
    step = model(jnp.asarray(ids[:, t + i:t + i + 1]), attention_mask=key_mask, position_ids=pos, cache=cache,
                 cache_index=t + i, decode_weights=decode_weights, head=model.head_weight())
    cache = step.cache
    np.testing.assert_allclose(np.asarray(step.logits)[:, -1], ref[:, t + i], atol=TOL, rtol=0)
