"""Qwen2 text decoder with multimodal rotary, scanned over layers, with an optional KV cache.

Layers are stored stacked (a leading layer axis on every parameter) and run with
`jax.lax.scan`, so compile time does not grow with depth; each step may be
rematerialised with a policy from the config.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dprl.models import layers
from dprl.models.sharding import constrain
from dprl.models.config import HF_INITIALIZER_RANGE, TextConfig

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class KVCache(NamedTuple):
  """Keys and values of every layer: k, v [L, B, S, K, Dh]."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype: Any) -> "KVCache":
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class Attention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
    d, dh = cfg.hidden_size, cfg.head_dim
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.q_proj = layers.Linear(d, cfg.num_attention_heads * dh, use_bias=True, **kw)
    self.k_proj = layers.Linear(d, cfg.num_key_value_heads * dh, use_bias=True, **kw)
    self.v_proj = layers.Linear(d, cfg.num_key_value_heads * dh, use_bias=True, **kw)
    self.o_proj = layers.Linear(cfg.num_attention_heads * dh, d, use_bias=False, **kw)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, dh

  def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None, return_probs=False,
               query_chunk=None):
    """x: [B, T, D]; cos, sin: [B, T, Dh]; mask: [B, T, S].

    With this layer's cache (k, v: [B, S, K, Dh]) attention runs over all S slots, the
    new keys/values placed at `cache_index`; returns them ([B, T, K, Dh]) for the caller
    to store. `query_chunk`: see `layers.attention`.
    """
    b, t, _ = x.shape
    q, k = self.query_key(x, cos, sin)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    new_kv = None
    if cache_kv is not None:
      # Attend over this layer's cache with the new keys/values in their slots; the caller
      # writes `new_kv` into the stacked cache (in place, as a loop carry).
      new_kv = (k.astype(cache_kv[0].dtype), v.astype(cache_kv[1].dtype))
      k = jax.lax.dynamic_update_slice_in_dim(cache_kv[0], new_kv[0], cache_index, axis=1).astype(q.dtype)
      v = jax.lax.dynamic_update_slice_in_dim(cache_kv[1], new_kv[1], cache_index, axis=1).astype(q.dtype)
    out, probs = layers.attention(q, k, v, mask, return_probs=return_probs,
                                  query_chunk=query_chunk)
    return self.o_proj(out.reshape(b, t, -1)), new_kv, probs

  def query_key(self, x, cos, sin):
    """Rotated queries and keys: x: [B, T, D] (normed); cos, sin: [B, T, Dh].

    Returns q [B, T, H, Dh], k [B, T, K, Dh]; what the attention probabilities are
    computed from (RAP's ACE recomputes them query-chunked from these).
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    return layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                                   param_dtype=param_dtype)
    self.self_attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act,
                               use_bias=False, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None, return_probs=False,
               query_chunk=None):
    h, new_cache, probs = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv,
                                         cache_index, return_probs, query_chunk)
    # The residual stream keeps its rows split over the batch axes (`constrain`), in the
    # backward pass too, instead of following the weights onto the hidden size.
    x = constrain(x + h, "residual")
    return constrain(x + self.mlp(self.post_attention_layernorm(x)), "residual"), new_cache, probs


class TextDecoder(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
               dtype: Any = jnp.float32, remat_policy: str = "none"):
    self.cfg = cfg
    self.dtype = dtype
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
    self.remat_policy = remat_policy
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
                                  dtype=dtype, embedding_init=nnx.initializers.normal(HF_INITIALIZER_RANGE), rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return DecoderLayer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

    self.layers = make_layers(rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

  def layer(self, index) -> DecoderLayer:
    """Decoder layer `index` (an int or a traced scalar) as a module of its own."""
    layer_def, layer_state = nnx.split(self.layers)
    return nnx.merge(layer_def, jax.tree.map(lambda a: a[index], layer_state))

  def run_layers(self, x, cos, sin, mask, cache: KVCache | None = None, cache_index=None,
                 attention_layers: tuple[int, ...] = (), stop_at_layer: int | None = None,
                 query_chunk: int | None = None):
    """Runs the decoder layers. x: [B, T, D] -> [B, T, D] (before the final norm).

    Layers in `attention_layers` also return their attention probabilities [B, H, T, S];
    the scan is split around them so no other layer materialises its probabilities.
    With `stop_at_layer` L, only layers 0..L-1 run and x is the residual stream entering
    layer L (its input, before its input_layernorm); no cache then. `query_chunk`: every
    layer attends that many queries at a time (`layers.attention`).

    With a mesh in context (`jax.sharding.use_abstract_mesh`) the residual stream is
    constrained by `sharding.ACTIVATION_RULES["residual"]` (rows over data and fsdp);
    without one, nothing changes.
    """
    x = constrain(x, "residual")
    layer_def, layer_state = nnx.split(self.layers)
    policy = REMAT_POLICIES[self.remat_policy]
    n = self.cfg.num_hidden_layers
    if stop_at_layer is not None:
      if not 0 <= stop_at_layer < n:
        raise ValueError(f"stop_at_layer {stop_at_layer} out of range for {n} layers")
      if cache is not None:
        raise ValueError("stop_at_layer with a cache: the later layers' slots would not be written")
      n = stop_at_layer

    def step(carry, xs, return_probs=False):
      h, kv = carry
      state, i = xs
      layer_kv = None if kv is None else (kv[0][i], kv[1][i])
      h, new_kv, probs = nnx.merge(layer_def, state)(h, cos, sin, mask, layer_kv, cache_index, return_probs,
                                                     query_chunk)
      if kv is not None:
        # Write only the new slots of layer i, so the stacked cache is updated in place.
        kv = tuple(jax.lax.dynamic_update_slice(c, u[None], (i, 0, cache_index, 0, 0)) for c, u in zip(kv, new_kv))
      return (h, kv), probs

    def scan_step(carry, xs):
      return step(carry, xs)[0], None

    if policy is not None:
      scan_step = jax.checkpoint(scan_step, policy=policy, prevent_cse=False)

    cuts = sorted({i for i in attention_layers if 0 <= i < n})
    if len(cuts) != len(set(attention_layers)):
      raise ValueError(f"attention_layers {attention_layers} out of range for {n} layers")
    carry = (x, None if cache is None else (cache.k, cache.v))
    probs_out = {}
    start = 0
    for stop in cuts + [n]:
      if (start, stop) == (0, self.cfg.num_hidden_layers):
        carry, _ = jax.lax.scan(scan_step, carry, (layer_state, jnp.arange(start, stop)))
      elif stop > start:
        # Part of the stack: each step indexes its layer. Scanning over the slice
        # a[start:stop] instead makes XLA copy those layers' weights first (measured:
        # 27 of 28 layers, ~13 GB bf16 for the 7B, when reading the last layer).
        def indexed_step(carry, i):
          return scan_step(carry, (jax.tree.map(lambda a: a[i], layer_state), i))
        carry, _ = jax.lax.scan(indexed_step, carry, jnp.arange(start, stop))
      if stop < n:
        carry, probs_out[stop] = step(carry, (jax.tree.map(lambda a: a[stop], layer_state), stop),
                                      return_probs=True)
      start = stop + 1
    x, kv = carry
    return x, (None if kv is None else KVCache(*kv)), probs_out
