"""Qwen2 text decoder with multimodal rotary, scanned over layers, with an optional KV cache.

Layers are stored stacked (a leading layer axis on every parameter) and run with
`jax.lax.scan`, so compile time does not grow with depth; each step may be
rematerialised with a policy from the config. Decoding with a KV cache unrolls them
instead (`TextDecoder.run_layers`), so each layer's cache is updated in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dprl.models import decoding, layers
from dprl.models.sharding import constrain
from dprl.models.config import HF_INITIALIZER_RANGE, TextConfig

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class KVCache(NamedTuple):
  """Keys and values, one array per layer: k[l]: [B, K, Dh, S], v[l]: [B, K, S, Dh].

  Per layer, not stacked [L, B, K, S, Dh]: a decode step writes each layer's new slot in
  place and attends over that layer's array as it is. With a stacked cache inside the
  layer scan, each step sliced its layer out (a copy of that layer's whole cache) and
  wrote the updated slice back, three passes over the cache per step instead of one.
  Heads second, not [B, S, K, Dh] as the projections emit them: the attention products
  then batch over (B, K), as dot kernels want (slot-major, XLA transposed every layer's
  whole cache in every decode step: ~60 us of a 225 us tiny-model step on CPU). Keys
  slots last and values slots third, so that both of a step's products are plain
  matrix products: scores q [G, Dh] @ k [Dh, S], output p [G, S] @ v [S, Dh]. With
  values [Dh, S] too, XLA:CPU took twice as long for the output product as for the
  scores (1.23 against 0.6 ms a layer at `benchmarks/sampler.py`'s small model, 64 rows).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  def extend(self, length: int, repeats: int = 1, dtype: Any = None) -> "KVCache":
    """A prompt's keys/values (as `run_layers(return_kv=True)` returns them, T slots) as
    the first T slots of a cache of `length` slots, each row repeated `repeats` times
    (row-major: b * repeats + j)."""
    def grow(c, axis):
      c = jnp.repeat(c if dtype is None else c.astype(dtype), repeats, axis=0)
      pad = [(0, 0)] * c.ndim
      pad[axis] = (0, length - c.shape[axis])
      return jnp.pad(c, pad)
    k_axis, v_axis = decoding.SLOT_AXES
    return KVCache(tuple(grow(c, k_axis) for c in self.k), tuple(grow(c, v_axis) for c in self.v))

  def map(self, fn) -> "KVCache":
    """`fn` applied to every layer's keys and values."""
    return KVCache(tuple(map(fn, self.k)), tuple(map(fn, self.v)))


class Attention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
    d, dh = cfg.hidden_size, cfg.head_dim
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.q_proj = layers.Linear(d, cfg.num_attention_heads * dh, use_bias=True, **kw)
    self.k_proj = layers.Linear(d, cfg.num_key_value_heads * dh, use_bias=True, **kw)
    self.v_proj = layers.Linear(d, cfg.num_key_value_heads * dh, use_bias=True, **kw)
    self.o_proj = layers.Linear(cfg.num_attention_heads * dh, d, use_bias=False, **kw)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, dh

  def __call__(self, x, cos, sin, mask, return_probs=False, query_chunk=None):
    """x: [B, T, D]; cos, sin: [B, T, Dh]; mask: [B, T, T].

    Returns (output [B, T, D], the T tokens' keys and values as `KVCache` holds them
    ([B, K, Dh, T] and [B, K, T, Dh]), probabilities [B, H, T, T] or None).
    `query_chunk`: see `layers.attention`. Decoding with a cache runs
    `decoding.decode_layer` instead.
    """
    b, t, _ = x.shape
    q, k = self.query_key(x, cos, sin)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    out, probs = layers.attention(q, k, v, mask, return_probs=return_probs, query_chunk=query_chunk)
    return self.o_proj(out.reshape(b, t, -1)), decoding.cache_layout(k, v), probs

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

  def __call__(self, x, cos, sin, mask, return_probs=False, query_chunk=None):
    h, kv, probs = self.self_attn(self.input_layernorm(x), cos, sin, mask, return_probs, query_chunk)
    # The residual stream keeps its rows split over the batch axes (`constrain`), in the
    # backward pass too, instead of following the weights onto the hidden size.
    x = constrain(x + h, "residual")
    return constrain(x + self.mlp(self.post_attention_layernorm(x)), "residual"), kv, probs


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

  def decode_weights(self, dtype: Any = None) -> tuple[decoding.DecodeWeights, ...]:
    """Each layer's weights fused for decoding (`decoding.decode_weights`), for
    `run_layers(decode_weights=...)`: a decode loop makes them once, before the loop,
    instead of XLA slicing each layer out of the stack in every step.

    With `dtype` (the compute dtype) they are cast once too: the layers cast their
    weights to it on every use, which for float32 parameters computed in bfloat16 would
    read 4 and write 2 bytes a weight in every decode step.
    """
    return tuple(decoding.decode_weights(self.layer(i), self.cfg, dtype) for i in range(self.cfg.num_hidden_layers))

  def run_layers(self, x, cos, sin, mask, cache: KVCache | None = None, cache_index=None,
                 attention_layers: tuple[int, ...] = (), stop_at_layer: int | None = None,
                 query_chunk: int | None = None, return_kv: bool = False,
                 decode_weights: tuple[decoding.DecodeWeights, ...] | None = None):
    """Runs the decoder layers. x: [B, T, D] -> [B, T, D] (before the final norm).

    Returns (x, cache, probabilities by layer). Layers in `attention_layers` also return
    their attention probabilities [B, H, T, S]; the scan is split around them so no other
    layer materialises its probabilities. With `stop_at_layer` L, only layers 0..L-1 run
    and x is the residual stream entering layer L (its input, before its
    input_layernorm); no cache then. `query_chunk`: every layer attends that many queries
    at a time (`layers.attention`).

    Caches (inference only):
      - `return_kv`: without a cache, the returned cache holds the T tokens' keys/values
        (a prefill's; `KVCache.extend` makes a decode cache of them).
      - `cache` (`KVCache`, S slots a layer; mask [B, T, S]): the T new tokens are written at
        `cache_index` and attend over all S slots; the updated cache is returned. The
        layers are unrolled (a Python loop, not a scan), so every layer's cache is its
        own loop-carried array, updated in place; they run `decoding.decode_layer` on
        `decode_weights` (`self.decode_weights(dtype)`, made once by the caller outside
        its decode loop; made here, in every step, when not given).

    With a mesh in context (`jax.sharding.use_abstract_mesh`) the residual stream is
    constrained by `sharding.ACTIVATION_RULES["residual"]` (rows over data and fsdp);
    without one, nothing changes.
    """
    x = constrain(x, "residual")
    layer_def, layer_state = nnx.split(self.layers)
    n = self.cfg.num_hidden_layers
    if stop_at_layer is not None:
      if not 0 <= stop_at_layer < n:
        raise ValueError(f"stop_at_layer {stop_at_layer} out of range for {n} layers")
      if cache is not None or return_kv:
        raise ValueError("stop_at_layer with a cache or return_kv: the later layers' keys/values "
                         "would not be computed")
      n = stop_at_layer
    cuts = sorted({i for i in attention_layers if 0 <= i < n})
    if len(cuts) != len(set(attention_layers)):
      raise ValueError(f"attention_layers {attention_layers} out of range for {n} layers")

    if cache is not None:
      if decode_weights is None:
        decode_weights = self.decode_weights()
      keys, values, probs_out = [], [], {}
      for i, weights in enumerate(decode_weights):
        x, (k, v), probs = decoding.decode_layer(weights, x, cos, sin, mask, (cache.k[i], cache.v[i]), cache_index,
                                                 self.cfg, self.dtype, return_probs=i in cuts)
        keys.append(k)
        values.append(v)
        if i in cuts:
          probs_out[i] = probs
      return x, KVCache(tuple(keys), tuple(values)), probs_out

    def step(h, state, return_probs=False):
      h, kv, probs = nnx.merge(layer_def, state)(h, cos, sin, mask, return_probs, query_chunk)
      return h, (kv if return_kv else None), probs

    def scan_step(h, state):
      h, kv, _ = step(h, state)
      return h, kv

    policy = REMAT_POLICIES[self.remat_policy]
    if policy is not None:
      scan_step = jax.checkpoint(scan_step, policy=policy, prevent_cse=False)

    kv_parts = []  # keys/values of consecutive runs of layers, stacked [layers, B, K, Dh, T]
    probs_out = {}
    start = 0
    for stop in cuts + [n]:
      if (start, stop) == (0, self.cfg.num_hidden_layers):
        x, kv = jax.lax.scan(scan_step, x, layer_state)
        kv_parts.append(kv)
      elif stop > start:
        # Part of the stack: each step indexes its layer. Scanning over the slice
        # a[start:stop] instead makes XLA copy those layers' weights first (measured:
        # 27 of 28 layers, ~13 GB bf16 for the 7B, when reading the last layer).
        def indexed_step(h, i):
          return scan_step(h, jax.tree.map(lambda a: a[i], layer_state))
        x, kv = jax.lax.scan(indexed_step, x, jnp.arange(start, stop))
        kv_parts.append(kv)
      if stop < n:
        x, kv, probs_out[stop] = step(x, jax.tree.map(lambda a: a[stop], layer_state), return_probs=True)
        kv_parts.append(jax.tree.map(lambda a: a[None], kv))
      start = stop + 1
    if not return_kv:
      return x, None, probs_out
    k, v = (jnp.concatenate([part[j] for part in kv_parts]) for j in (0, 1))
    return x, KVCache(tuple(k[i] for i in range(n)), tuple(v[i] for i in range(n))), probs_out
