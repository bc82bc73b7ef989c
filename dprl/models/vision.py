"""Qwen2.5-VL vision tower: patch embedding, 2-D rotary, windowed/full attention blocks,
and the 2x2 patch merger.

All images of a batch are packed along one axis of patches, in the order the image
processor emits them: per image, per frame, blocks of merge x merge patches in raster
order. Which patches may attend to which is given by segment ids (one per window, or
one per frame for the full-attention blocks), so the tower is one jittable function of
`pixel_values` and `image_grid_thw` (traced or not), with no Python loop over images.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dprl.models import layers, rope
from dprl.models.config import VisionConfig
from dprl.models.sharding import constrain


class VisionLayout(NamedTuple):
  """Where each patch sits, derived from image_grid_thw.

  window_order: [N] patch permutation into window-major order (merge units kept whole).
  rows, cols: [N] patch coordinates (for the 2-D rotary), in processor order.
  window_segment: [N] window id of each patch, in window order.
  frame_segment: [N] (image, frame) id of each patch, in window order.
  """

  window_order: jax.Array
  rows: jax.Array
  cols: jax.Array
  window_segment: jax.Array
  frame_segment: jax.Array


def vision_layout(image_grid_thw: jax.Array, num_patches: int, cfg: VisionConfig) -> VisionLayout:
  """Transcribes transformers' `get_vision_window_index`/`get_vision_position_ids`.

  A window covers `window_size // patch_size // merge` merge units per side, counted from
  each frame's top-left corner; ragged windows at the right and bottom edges are smaller.
  Args:
    image_grid_thw: [I, 3] patch grid (t, h, w) of each image.
    num_patches: N = sum(t * h * w), static.
  """
  grid = jnp.asarray(image_grid_thw, jnp.int32)
  m = cfg.spatial_merge_size
  win = cfg.window_size // m // cfg.patch_size  # merge units per window side
  sizes = grid[:, 0] * grid[:, 1] * grid[:, 2]
  ends = jnp.cumsum(sizes)
  p = jnp.arange(num_patches, dtype=jnp.int32)
  img = jnp.searchsorted(ends, p, side="right").astype(jnp.int32)
  local = p - (ends[img] - sizes[img])
  h, w = grid[img, 1], grid[img, 2]
  hb, wb = h // m, w // m  # merge units per side
  unit, in_unit = local // (m * m), local % (m * m)
  frame = unit // (hb * wb)
  unit_row = (unit // wb) % hb
  unit_col = unit % wb
  rows = unit_row * m + in_unit // m
  cols = unit_col * m + in_unit % m
  win_row, win_col = unit_row // win, unit_col // win
  wins_per_row = (wb + win - 1) // win
  wins_per_frame = wins_per_row * ((hb + win - 1) // win)
  # Global ids: number frames and windows consecutively over images.
  frames = grid[:, 0]
  frame_base = jnp.cumsum(frames) - frames
  frame_id = frame_base[img] + frame
  win_counts = frames * ((grid[:, 1] // m + win - 1) // win) * ((grid[:, 2] // m + win - 1) // win)
  win_base = jnp.cumsum(win_counts) - win_counts
  window_id = win_base[img] + frame * wins_per_frame + win_row * wins_per_row + win_col
  # Window-major order: window (numbered image, frame, window row, window col), then the
  # unit's place inside the window, then the patch inside the unit, as one sort key:
  # one key sorts in a fifth of the time of the seven a lexsort takes (XLA:CPU).
  place = ((unit_row % win) * win + unit_col % win) * (m * m) + in_unit  # < (win * m)^2
  order = jnp.argsort(window_id * (win * win * m * m) + place, stable=True).astype(jnp.int32)
  return VisionLayout(order, rows, cols, window_id[order], frame_id[order])


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
    d = cfg.hidden_size
    self.qkv = layers.Linear(d, 3 * d, use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.proj = layers.Linear(d, d, use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.num_heads = cfg.num_heads

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment: jax.Array,
               block: int | None) -> jax.Array:
    """x: [N, D]; cos, sin: [N, Dh]; segment: [N] (attend only within a segment, each at
    most `block` long, or dense attention when block is None)."""
    n, d = x.shape
    qkv = self.qkv(x).reshape(n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # transformers applies the vision rotary in float32 and casts back.
    q = layers.apply_rotary(q.astype(jnp.float32), cos, sin).astype(x.dtype)
    k = layers.apply_rotary(k.astype(jnp.float32), cos, sin).astype(x.dtype)
    out = layers.segment_attention(q, k, v, segment, block)
    return self.proj(out.reshape(n, d))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
    kw = dict(param_dtype=param_dtype)
    self.norm1 = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.norm2 = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.attn = VisionAttention(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act,
                               use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  def __call__(self, x, cos, sin, segment, block=None):
    x = x + self.attn(self.norm1(x), cos, sin, segment, block)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then concatenate each 2x2 unit of patches and project with a GELU MLP."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
    d = cfg.hidden_size * cfg.spatial_merge_size**2
    kw = dict(use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.ln_q = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.fc1 = layers.Linear(d, d, **kw)
    self.fc2 = layers.Linear(d, cfg.out_hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.ln_q(x)
    x = x.reshape(-1, self.fc1.kernel.shape[0])
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
               dtype: Any = jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    self.patch_embed = layers.Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, rngs=rngs,
                                     param_dtype=param_dtype, dtype=dtype)

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return VisionBlock(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

    self.blocks = make_blocks(rngs)
    self.merger = PatchMerger(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  def __call__(self, pixel_values: jax.Array, image_grid_thw: jax.Array,
               max_frame_patches: int | None = None) -> jax.Array:
    """pixel_values: [N, C*T*P*P] (processor order); image_grid_thw: [I, 3].

    max_frame_patches: a static bound on h*w of every image (callers that know the grids
      on the host pass it); the full-attention blocks then attend block-locally too.
      Without it they use dense N x N attention masked to each frame.
    Returns the merged image features [N / merge^2, out_hidden_size], in processor order.
    """
    cfg = self.cfg
    n = pixel_values.shape[0]
    lay = vision_layout(image_grid_thw, n, cfg)
    x = self.patch_embed(pixel_values)
    x = x[lay.window_order]
    cos, sin = rope.vision_cos_sin(lay.rows[lay.window_order].astype(jnp.float32),
                                   lay.cols[lay.window_order].astype(jnp.float32),
                                   cfg.head_dim, cfg.rope_theta)
    is_full = jnp.isin(jnp.arange(cfg.depth), jnp.asarray(cfg.fullatt_block_indexes, jnp.int32))
    block_def, block_state = nnx.split(self.blocks)

    # A window holds at most (window / patch)^2 patches (merge units are never split).
    window_block = (cfg.window_size // cfg.patch_size) ** 2

    def body(h, xs):
      state, full = xs
      blk = nnx.merge(block_def, state)
      windowed = lambda h: blk(h, cos, sin, lay.window_segment, window_block)
      frames = lambda h: blk(h, cos, sin, lay.frame_segment, max_frame_patches)
      return constrain(jax.lax.cond(full, frames, windowed, h), "patches"), None

    # With a mesh in context the patches' rows split over the batch axes, as the decoder's
    # rows do; otherwise every device runs the tower on every image of the micro-batch.
    x, _ = jax.lax.scan(body, constrain(x, "patches"), (block_state, is_full))
    merged = self.merger(x)
    # Undo the window permutation at merge-unit granularity (its inverse: a scatter, not a sort).
    unit_order = lay.window_order[:: cfg.spatial_merge_size**2] // cfg.spatial_merge_size**2
    units = jnp.arange(unit_order.shape[0], dtype=unit_order.dtype)
    return merged[jnp.zeros_like(unit_order).at[unit_order].set(units)]
