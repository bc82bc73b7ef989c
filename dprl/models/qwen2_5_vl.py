"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) as a Flax NNX module used functionally.

    from dprl.models import qwen2_5_vl
    model = qwen2_5_vl.from_pretrained(path, dtype=jnp.float32)
    out = model(input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
    out.logits  # [B, T, V] float32
    qwen2_5_vl.save_pretrained(model, out_dir)

Into jitted code, pass the module itself as an argument (NNX modules are pytrees; jit
flattens one in a tenth of the time `nnx.split` takes), or its split `state` with
`nnx.merge` inside; never close over weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dprl.models import rope
from dprl.models.config import HF_INITIALIZER_RANGE, ModelConfig, get_preset
from dprl.models.layers import Linear
from dprl.models.text import KVCache, TextDecoder
from dprl.models.vision import VisionTower


class ModelOutput(NamedTuple):
  logits: jax.Array  # [B, T', V] float32 (T' = logits_to_keep or T)
  rope_deltas: jax.Array  # [B] int32: decoding position = real tokens so far + delta
  cache: KVCache | None = None
  attentions: dict[int, jax.Array] | None = None  # layer -> [B, H, T, S] float32
  hidden_states: jax.Array | None = None  # [B, T, D] after the final norm
  layer_input: jax.Array | None = None  # [B, T, D] entering layer `stop_at_layer`


class ImageTokenMismatchError(ValueError):
  """The number of image tokens in input_ids does not match image_grid_thw."""


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def check_image_inputs(input_ids, pixel_values, image_grid_thw, cfg: ModelConfig) -> None:
  """Host-side consistency checks (skipped under tracing, where values are unknown)."""
  if image_grid_thw is None:
    if pixel_values is not None:
      raise ValueError("pixel_values given without image_grid_thw")
    if _is_concrete(input_ids) and bool(np.any(np.asarray(input_ids) == cfg.image_token_id)):
      raise ImageTokenMismatchError(
          f"input_ids contain image tokens (id {cfg.image_token_id}) but no image_grid_thw/pixel_values were given")
    return
  if pixel_values is None:
    raise ValueError("image_grid_thw given without pixel_values")
  if not _is_concrete(input_ids, pixel_values, image_grid_thw):
    return
  grid = np.asarray(image_grid_thw)
  if grid.ndim != 2 or grid.shape[1] != 3:
    raise ValueError(f"image_grid_thw must be [num_images, 3], got shape {grid.shape}")
  m = cfg.vision.spatial_merge_size
  if np.any(grid[:, 1:] % m):
    raise ValueError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of spatial_merge_size {m}")
  n_patches = int(np.prod(grid, axis=1).sum())
  if pixel_values.shape[0] != n_patches:
    raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, image_grid_thw implies {n_patches}")
  if pixel_values.shape[1] != cfg.vision.patch_dim:
    raise ValueError(f"pixel_values rows have {pixel_values.shape[1]} values, expected {cfg.vision.patch_dim}")
  n_tokens = int((np.asarray(input_ids) == cfg.image_token_id).sum())
  expected = n_patches // (m * m)
  if n_tokens != expected:
    raise ImageTokenMismatchError(
        f"input_ids have {n_tokens} image tokens (id {cfg.image_token_id}) but image_grid_thw "
        f"{grid.tolist()} needs {expected} (sum of t*h*w / {m * m})")


def frame_patch_bound(image_grid_thw, minimum: int = 64) -> int | None:
  """A power of two >= the largest h*w in `image_grid_thw` (host values), or None.

  Bucketed so that jitted callers keyed on it see few distinct values.
  """
  if image_grid_thw is None:
    return None
  grid = np.asarray(image_grid_thw)
  if grid.size == 0:
    return None
  largest = int((grid[:, 1] * grid[:, 2]).max())
  return max(minimum, 1 << max(0, largest - 1).bit_length())


class Qwen2_5_VL(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.config = cfg
    self.visual = VisionTower(cfg.vision, rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    self.model = TextDecoder(cfg.text, rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype,
                             remat_policy=cfg.remat_policy)
    if cfg.tie_word_embeddings:
      self.lm_head = None
    else:
      init = nnx.initializers.normal(HF_INITIALIZER_RANGE)
      self.lm_head = nnx.Param(init(rngs.params(), (cfg.text.hidden_size, cfg.text.vocab_size), cfg.param_dtype))

  def embed(self, input_ids: jax.Array, pixel_values=None, image_grid_thw=None,
            max_frame_patches: int | None = None) -> jax.Array:
    """Token embeddings with image features scattered into the image-token slots: [B, T, D]."""
    x = self.model.embed_tokens(input_ids).astype(self.config.dtype)
    if pixel_values is None:
      return x
    if max_frame_patches is None and _is_concrete(image_grid_thw):
      max_frame_patches = frame_patch_bound(image_grid_thw)
    features = self.visual(pixel_values.astype(self.config.dtype), image_grid_thw,
                           max_frame_patches).astype(x.dtype)
    is_img = (input_ids == self.config.image_token_id).reshape(-1)
    # The k-th image token (row-major over the batch) takes the k-th feature row.
    src = jnp.clip(jnp.cumsum(is_img) - 1, 0, features.shape[0] - 1)
    flat = jnp.where(is_img[:, None], features[src], x.reshape(-1, x.shape[-1]))
    return flat.reshape(x.shape)

  def head_weight(self) -> jax.Array:
    """The output projection as stored, in the compute dtype: the token embedding [V, D]
    when tied, else lm_head [D, V]. A decode loop casts it once (`logits(head=...)`)
    rather than in every step."""
    w = self.model.embed_tokens.embedding if self.lm_head is None else self.lm_head
    return w[...].astype(self.config.dtype)

  def logits(self, hidden: jax.Array, head: jax.Array | None = None) -> jax.Array:
    """hidden: [B, T, D] (normed) -> float32 logits [B, T, V]; head: `head_weight()`."""
    w = self.head_weight() if head is None else head
    if self.lm_head is None:
      w = w.T
    return jnp.dot(hidden.astype(self.config.dtype), w, preferred_element_type=jnp.float32)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None, image_grid_thw: jax.Array | None = None, *,
               position_ids: jax.Array | None = None, cache: KVCache | None = None,
               cache_index: jax.Array | int = 0, logits_to_keep: int = 0,
               attention_layers: tuple[int, ...] = (), return_hidden: bool = False,
               max_frame_patches: int | None = None,
               stop_at_layer: int | None = None,
               query_chunk: int | None = None, return_kv: bool = False,
               decode_weights: tuple[Any, ...] | None = None, head: jax.Array | None = None) -> ModelOutput:
    """Forward pass of a left-padded batch.

    Args:
      input_ids: [B, T] int.
      attention_mask: [B, T] (1 = real token) without a cache; with a cache, [B, S]
        over all cache slots, the T new tokens included.
      pixel_values: [N, C*T*P*P] patches of all images of the batch, processor format.
      image_grid_thw: [I, 3].
      position_ids: [3, B, T]; computed as transformers' `get_rope_index` when None
        (with a cache only valid for a prefill starting at slot 0).
      cache: KVCache of S slots; the new keys/values go to slots [cache_index, cache_index+T)
        and the updated cache is returned (decoding: layers unrolled, `TextDecoder.run_layers`).
      return_kv: without a cache, return the T tokens' keys/values as `cache` (a prefill's).
      decode_weights, head: `self.model.decode_weights(dtype)` and `self.head_weight()`,
        made and cast once outside a decode loop.
      logits_to_keep: if > 0, only the last that many positions get logits.
      attention_layers: decoder layers whose attention probabilities to return.
      max_frame_patches: static bound on every image's h*w patches (`frame_patch_bound`),
        which lets the vision tower's full-attention blocks attend block-locally;
        computed here when image_grid_thw is concrete, pass it under jit.
      stop_at_layer: if set (L), run decoder layers 0..L-1 only and return the residual
        stream entering layer L as `layer_input`; logits are then None and no layer from
        L on runs (RAP's ACE recomputes layer L's attention from it, query-chunked).
      query_chunk: decoder attention runs this many queries at a time, so no layer holds
        more than [B, H, query_chunk, S] float32 scores (exact; `layers.attention`).
        Layers in `attention_layers` still compute their probabilities whole.
    """
    cfg = self.config
    check_image_inputs(input_ids, pixel_values, image_grid_thw, cfg)
    b, t = input_ids.shape
    if cache is None:
      key_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
      token_mask = key_mask
      query_slot = jnp.arange(t)
    else:
      s = cache.k[0].shape[3]
      key_mask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
      if key_mask.shape[1] != s:
        raise ValueError(f"with a cache, attention_mask must cover all {s} cache slots, got {key_mask.shape}")
      token_mask = jax.lax.dynamic_slice_in_dim(key_mask, cache_index, t, axis=1)
      query_slot = cache_index + jnp.arange(t)
    if position_ids is None:
      position_ids, rope_deltas = rope.mrope_position_ids(
          input_ids, token_mask, image_grid_thw, image_token_id=cfg.image_token_id,
          spatial_merge_size=cfg.vision.spatial_merge_size)
    else:
      rope_deltas = jnp.zeros((b,), jnp.int32)
    x = self.embed(input_ids, pixel_values, image_grid_thw, max_frame_patches)
    cos, sin = rope.mrope_cos_sin(position_ids, cfg.text.head_dim, cfg.text.rope_theta,
                                  cfg.text.mrope_section, cfg.dtype)
    key_slot = jnp.arange(key_mask.shape[1])
    mask = (key_slot[None, None, :] <= query_slot[None, :, None]) & key_mask[:, None, :]
    x, new_cache, attentions = self.model.run_layers(x, cos, sin, mask, cache, cache_index, attention_layers,
                                                     stop_at_layer, query_chunk, return_kv, decode_weights)
    if stop_at_layer is not None:
      return ModelOutput(None, rope_deltas, None, attentions or None, layer_input=x)
    x = self.model.norm(x)
    if logits_to_keep:
      x = x[:, -logits_to_keep:]
    return ModelOutput(self.logits(x, head), rope_deltas, new_cache, attentions or None,
                       x if return_hidden else None)


def init(cfg: ModelConfig | str, seed: int = 0) -> Qwen2_5_VL:
  """A randomly initialised model (for tests, the demo, and abstract shapes), drawn as
  `cfg.init_scheme` says."""
  if isinstance(cfg, str):
    cfg = get_preset(cfg)
  model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(seed))
  if cfg.init_scheme == "fan_in":
    _rescale_to_fan_in(model)
  return model


def _rescale_to_fan_in(model: Qwen2_5_VL) -> None:
  """N(0, 0.02) draws -> N(0, 1/fan_in) kernels, in place (a scaled normal is a normal, so
  this is the fan-in init without a second initialiser threaded through every layer).

  Token embeddings go to N(0, 1), the scale of the normalised activations they are added
  to (at N(0, 0.02) a token's identity would vanish under the first layer's fan-in-sized
  updates); tied ones, which are also the output projection, to N(0, 1/hidden).
  """
  def rescale(param: nnx.Param, std: float) -> None:
    param[...] = param[...] * (std / HF_INITIALIZER_RANGE)

  for _, node in nnx.iter_graph(model):
    if isinstance(node, Linear):
      rescale(node.kernel, node.kernel.shape[0] ** -0.5)
  hidden = model.config.text.hidden_size
  embedding = model.model.embed_tokens.embedding
  rescale(embedding, hidden ** -0.5 if model.lm_head is None else 1.0)
  if model.lm_head is not None:
    rescale(model.lm_head, hidden ** -0.5)


def abstract(cfg: ModelConfig) -> Qwen2_5_VL:
  """The model with ShapeDtypeStructs for weights: nothing allocated."""
  return nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))


def from_pretrained(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = None, mesh=None,
                    **config_overrides: Any) -> Qwen2_5_VL:
  from dprl.models.weights import load_pretrained  # pylint: disable=g-import-not-at-top
  return load_pretrained(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **config_overrides)


def save_pretrained(model: Qwen2_5_VL, out_dir: str, **kwargs: Any) -> None:
  from dprl.models.weights import save_pretrained as _save  # pylint: disable=g-import-not-at-top
  _save(model, out_dir, **kwargs)
