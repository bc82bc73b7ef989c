"""A decoder layer's weights fused for cached decoding, and the layer as a pure function of them.

A decode step multiplies a few rows by every weight matrix, so its cost is one kernel
launch (GPU) or one thunk (XLA:CPU) per matrix plus the bytes each reads. Fusing the
query/key/value projections into one matrix and the gate/up projections into another
takes three of a layer's seven matrix products away and reads the same bytes. The
stored parameters stay separate (loading, sharding rules and training are per
projection); `decode_weights` builds the fused copies once a `generate` call, outside
its decode loop, in the compute dtype.

The fused query/key/value matrix is grouped by key/value head, [D, K, G + 2, Dh] (a
head's G query heads, its key, its value), so that splitting K over the mesh's `tensor`
axis keeps each device's query heads beside their key/value head, as the separate
projections' sharding does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dprl.models import layers
from dprl.models.config import TextConfig
from dprl.models.sharding import constrain


def cache_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keys and values as projected, [B, T, K, Dh], in `text.KVCache`'s layouts: keys
  [B, K, Dh, T], values [B, K, T, Dh]."""
  return jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))


SLOT_AXES = (3, 2)  # the slot axis of `cache_layout`'s keys and values


class DecodeWeights(NamedTuple):
  """One decoder layer's parameters for `decode_layer`."""

  input_norm: jax.Array  # [D]
  qkv_kernel: jax.Array  # [D, K, G + 2, Dh]: G query heads, then key, then value
  qkv_bias: jax.Array  # [K, G + 2, Dh]
  o_kernel: jax.Array  # [H * Dh, D]
  post_norm: jax.Array  # [D]
  gate_up_kernel: jax.Array  # [D, 2, I]
  down_kernel: jax.Array  # [I, D]


def decode_weights(layer, cfg: TextConfig, dtype: Any = None) -> DecodeWeights:
  """The fused weights of `layer` (a `text.DecoderLayer`), cast to `dtype` if given."""
  attn, mlp = layer.self_attn, layer.mlp
  d, kv, dh = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim
  g = cfg.num_attention_heads // kv
  cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
  qkv_kernel = jnp.concatenate([attn.q_proj.kernel[...].reshape(d, kv, g, dh),
                                attn.k_proj.kernel[...].reshape(d, kv, 1, dh),
                                attn.v_proj.kernel[...].reshape(d, kv, 1, dh)], axis=2)
  qkv_bias = jnp.concatenate([attn.q_proj.bias[...].reshape(kv, g, dh), attn.k_proj.bias[...].reshape(kv, 1, dh),
                              attn.v_proj.bias[...].reshape(kv, 1, dh)], axis=1)
  gate_up = jnp.stack([mlp.gate_proj.kernel[...], mlp.up_proj.kernel[...]], axis=1)
  return DecodeWeights(cast(layer.input_layernorm.scale[...]), cast(qkv_kernel), cast(qkv_bias),
                       cast(attn.o_proj.kernel[...]), cast(layer.post_attention_layernorm.scale[...]),
                       cast(gate_up), cast(mlp.down_proj.kernel[...]))


def decode_layer(w: DecodeWeights, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache_kv: tuple[jax.Array, jax.Array], cache_index, cfg: TextConfig, dtype: Any,
                 return_probs: bool = False):
  """`text.DecoderLayer` with a cache, from fused weights.

  x: [B, T, D]; cos, sin: [B, T, Dh]; mask: [B, T, S]; cache_kv: this layer's keys
  [B, K, Dh, S] and values [B, K, S, Dh] (`text.KVCache`), the T new ones written at
  slots [cache_index, cache_index + T).
  Returns (x [B, T, D], the updated (keys, values), probabilities [B, H, T, S] or None).
  """
  b, t, _ = x.shape
  kv, dh = cfg.num_key_value_heads, cfg.head_dim
  g = cfg.num_attention_heads // kv
  h = layers.rms_norm(x, w.input_norm, cfg.rms_norm_eps)
  qkv = jnp.einsum("btd,dkjh->btkjh", h.astype(dtype), w.qkv_kernel) + w.qkv_bias  # [B, T, K, G + 2, Dh]
  q = layers.apply_rotary(qkv[:, :, :, :g].reshape(b, t, kv * g, dh), cos, sin)
  k = layers.apply_rotary(qkv[:, :, :, g], cos, sin)
  v = qkv[:, :, :, g + 1]
  k, v = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache_index, axis=axis)
          for c, new, axis in zip(cache_kv, cache_layout(k, v), SLOT_AXES))
  out, probs = layers.cached_attention(q, k.astype(dtype), v.astype(dtype), mask, return_probs=return_probs)
  x = constrain(x + jnp.dot(out.reshape(b, t, -1), w.o_kernel), "residual")
  h = layers.rms_norm(x, w.post_norm, cfg.rms_norm_eps)
  gate_up = jnp.einsum("btd,dji->btji", h.astype(dtype), w.gate_up_kernel)
  act = layers.activation(cfg.hidden_act)
  x = constrain(x + jnp.dot(act(gate_up[:, :, 0]) * gate_up[:, :, 1], w.down_kernel), "residual")
  return x, (k, v), probs
