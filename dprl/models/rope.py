"""Rotary position embeddings of Qwen2.5-VL: 2-D for the vision tower, 3-D (mrope) for text.

`mrope_position_ids` is a vectorised, jittable transcription of transformers'
`Qwen2_5_VLModel.get_rope_index` for images: no Python loop over rows or images, so it
runs inside jit with traced `input_ids`, `attention_mask` and `image_grid_thw`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def text_inv_freq(head_dim: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def mrope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float,
                  mrope_section: tuple[int, int, int], dtype) -> tuple[jax.Array, jax.Array]:
  """position_ids: [3, B, T] (temporal, height, width) -> cos, sin: [B, T, head_dim].

  Frequency f takes its angle from the position axis whose mrope section contains f
  (transformers' `recomposition_frequencies`), and the half is repeated (rotate_half layout).
  """
  axis_of_freq = np.repeat(np.arange(3), mrope_section)  # [head_dim/2]
  pos = position_ids.astype(jnp.float32)[axis_of_freq]  # [head_dim/2, B, T]
  freqs = jnp.moveaxis(pos, 0, -1) * text_inv_freq(head_dim, theta)  # [B, T, head_dim/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_cos_sin(rows: jax.Array, cols: jax.Array, head_dim: int,
                   theta: float) -> tuple[jax.Array, jax.Array]:
  """rows, cols: [N] patch coordinates -> cos, sin: [N, head_dim] (float32).

  Axial rope: the first half of the rotated dims follow the row, the second the column,
  each with head_dim/4 frequencies over a base of head_dim/2.
  """
  spatial_dim = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))
  emb = jnp.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=-1)
  emb = jnp.concatenate([emb, emb], axis=-1).astype(jnp.float32)
  return jnp.cos(emb), jnp.sin(emb)


def mrope_position_ids(input_ids: jax.Array, attention_mask: jax.Array | None,
                       image_grid_thw: jax.Array | None, *, image_token_id: int,
                       spatial_merge_size: int) -> tuple[jax.Array, jax.Array]:
  """3-D positions of a left- or right-padded multimodal batch, as `get_rope_index` computes.

  Text tokens count up by one; the tokens of an image of merged grid (t, h, w) starting at
  position p get (p + t_i, p + h_i, p + w_i), and text after it resumes at
  p + max(h, w). Padding positions are 0.

  Args:
    input_ids: [B, T]; attention_mask: [B, T] (1 = real token) or None.
    image_grid_thw: [N, 3] patch grids of the images in the order their tokens appear
      (row-major over the batch), or None for text only.
  Returns:
    position_ids [3, B, T] int32 and rope_deltas [B] int32 (max position + 1 - real length),
    the offset decoding adds to the running token count.
  """
  b, t = input_ids.shape
  mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
  valid = mask > 0
  idx = jnp.cumsum(mask, axis=1) - 1  # index among the row's real tokens
  if image_grid_thw is None or image_grid_thw.shape[0] == 0:
    pos = jnp.where(valid, idx, 0).astype(jnp.int32)
    deltas = jnp.where(valid.any(1), pos.max(1) + 1 - mask.sum(1), 0).astype(jnp.int32)
    return jnp.broadcast_to(pos, (3, b, t)), deltas

  grid = jnp.asarray(image_grid_thw, jnp.int32)
  m = spatial_merge_size
  gt, gh, gw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
  n_tokens = gt * gh * gw
  span = jnp.maximum(gh, gw)  # positions an image advances the text by

  is_img = (input_ids == image_token_id) & valid
  prev_img = jnp.pad(is_img[:, :-1], ((0, 0), (1, 0)))
  run_start = is_img & ~prev_img
  # Images are numbered in order of appearance over the flattened batch.
  image_id = jnp.cumsum(run_start.reshape(-1)).reshape(b, t) - 1
  image_id = jnp.clip(image_id, 0, grid.shape[0] - 1)
  # Offset of each image token inside its image, from the real-token index of its start.
  start_idx = jax.lax.cummax(jnp.where(run_start, idx, -1), axis=1)
  offset = idx - start_idx
  # Each image shifts later positions by (span - n_tokens); accumulate over the row,
  # counting an image once its last token has passed.
  run_end = is_img & (offset == n_tokens[image_id] - 1)
  shift_after = jnp.cumsum(jnp.where(run_end, span[image_id] - n_tokens[image_id], 0), axis=1)
  shift_before = shift_after - jnp.where(run_end, span[image_id] - n_tokens[image_id], 0)

  text_pos = idx + shift_before
  image_base = start_idx + shift_before  # position of the image's first token
  hw = gh[image_id] * gw[image_id]
  t_off = offset // hw
  h_off = (offset // gw[image_id]) % gh[image_id]
  w_off = offset % gw[image_id]
  pos = jnp.stack([
      jnp.where(is_img, image_base + t_off, text_pos),
      jnp.where(is_img, image_base + h_off, text_pos),
      jnp.where(is_img, image_base + w_off, text_pos),
  ])
  pos = jnp.where(valid[None], pos, 0).astype(jnp.int32)
  deltas = jnp.where(valid.any(1), pos.max(axis=(0, 2)) + 1 - mask.sum(1), 0).astype(jnp.int32)
  return pos, deltas
