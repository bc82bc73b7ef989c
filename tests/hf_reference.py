"""Tiny random transformers Qwen2.5-VL checkpoints and inputs, the reference for parity tests.

Only tests import this module (torch is a test dependency, never a dprl one).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

TINY = dict(
    text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     bos_token_id=None, eos_token_id=None),
    vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                       fullatt_block_indexes=[1], window_size=112),
    image_token_id=290, video_token_id=291, vision_start_token_id=288, vision_end_token_id=289,
)
IMAGE_TOKEN, VISION_START, VISION_END = 290, 288, 289
PATCH_DIM = 3 * 2 * 14 * 14


def make_hf_model(seed: int = 0, tie_word_embeddings: bool = False, **overrides) -> Qwen2_5_VLForConditionalGeneration:
  """A random tiny model whose norm weights and biases are moved off their init values,
  so a tensor that the loader skipped or misplaced changes the logits."""
  torch.manual_seed(seed)
  kwargs = {**TINY, **overrides, "tie_word_embeddings": tie_word_embeddings}
  model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        p.add_(0.1 * torch.randn_like(p))
      elif p.dim() >= 2:
        p.normal_(0.0, 0.08)
  return model


def multimodal_batch(grids: list[list[tuple[int, int, int]]], text_lens: list[int], seed: int = 0,
                     merge: int = 2, vocab: int = 280):
  """Left-padded input_ids with each row's images ([<vs> <img>*n <ve>] then text).

  Returns input_ids [B, T], attention_mask [B, T], pixel_values [N, D], image_grid_thw [I, 3].
  """
  rng = np.random.default_rng(seed)
  rows = []
  for row_grids, n_text in zip(grids, text_lens):
    ids = list(rng.integers(0, vocab, size=2))
    for (t, h, w) in row_grids:
      ids += [VISION_START] + [IMAGE_TOKEN] * (t * h * w // merge**2) + [VISION_END]
      ids += list(rng.integers(0, vocab, size=2))
    ids += list(rng.integers(0, vocab, size=n_text))
    rows.append(ids)
  length = max(map(len, rows))
  input_ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, ids in enumerate(rows):
    input_ids[i, length - len(ids):] = ids
    mask[i, length - len(ids):] = 1
  flat_grids = [g for row in grids for g in row]
  n_patches = sum(t * h * w for t, h, w in flat_grids)
  pixel_values = rng.standard_normal((n_patches, PATCH_DIM)).astype(np.float32)
  grid_thw = np.array(flat_grids, np.int64).reshape(-1, 3)
  return input_ids, mask, pixel_values, grid_thw


def hf_logits(model, input_ids, mask, pixel_values=None, grid_thw=None) -> np.ndarray:
  """transformers' logits with 3-D positions from its own get_rope_index."""
  ids = torch.from_numpy(input_ids)
  am = torch.from_numpy(mask)
  mm_types = (ids == IMAGE_TOKEN).int()
  kwargs = {}
  if pixel_values is not None:
    kwargs = dict(pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grid_thw))
  # transformers 5.x builds 3-D positions only when given mm_token_type_ids; for text only it
  # would fall back to arange positions that ignore left padding, so ask get_rope_index directly.
  position_ids, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm_types, attention_mask=am,
                                               image_grid_thw=kwargs.get("image_grid_thw"))
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=am, position_ids=position_ids, **kwargs)
  return out.logits.float().numpy()
