"""Random init schemes and the 1x1-merge vision tower of the cpu_demo preset."""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dprl import cli
from dprl import train as train_lib
from dprl.data import tokenizer as tokenizer_lib
from dprl.models import qwen2_5_vl
from dprl.models.config import get_preset
from dprl.models.layers import Linear
from hf_reference import TINY, hf_logits, make_hf_model, multimodal_batch

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _kernels(model):
  return [(path, node.kernel[...]) for path, node in nnx.iter_graph(model)
          if isinstance(node, Linear)]


def test_hf_scheme_draws_every_kernel_from_n_0_002():
  model = qwen2_5_vl.init(get_preset("cpu_demo", init_scheme="hf"), seed=0)
  for path, kernel in _kernels(model):
    assert abs(float(np.std(kernel)) - 0.02) < 0.003, path


def test_fan_in_scheme_draws_kernels_from_n_0_1_over_fan_in():
  cfg = get_preset("cpu_demo")
  assert cfg.init_scheme == "fan_in"
  model = qwen2_5_vl.init(cfg, seed=0)
  kernels = _kernels(model)
  assert len(kernels) >= 10
  for path, kernel in kernels:
    expected = kernel.shape[0] ** -0.5
    assert abs(float(np.std(kernel)) / expected - 1) < 0.1, (path, kernel.shape)
  assert abs(float(np.std(model.model.embed_tokens.embedding[...])) - 1) < 0.05
  head = model.lm_head[...]
  assert abs(float(np.std(head)) * head.shape[0] ** 0.5 - 1) < 0.05


def test_fan_in_keeps_image_features_image_dependent():
  """The failure the scheme fixes: under N(0, 0.02) the narrow tower's output is ~0.01
  and nearly constant across images; fan-in keeps it O(1) and varying."""
  ids, mask, pv, thw = multimodal_batch([[(1, 4, 4)]] * 8, [2] * 8, merge=1, seed=1)
  spread = {}
  for scheme in ("hf", "fan_in"):
    model = qwen2_5_vl.init(get_preset("cpu_demo", init_scheme=scheme), seed=0)
    features = np.asarray(model.visual(jnp.asarray(pv), jnp.asarray(thw))).reshape(8, 16, -1)
    spread[scheme] = float(features.std(axis=0).mean())
  assert spread["hf"] < 0.05 < 0.2 < spread["fan_in"]


def test_unknown_init_scheme_is_named():
  with pytest.raises(ValueError, match="init_scheme 'xavier'"):
    qwen2_5_vl.init(get_preset("cpu_demo", init_scheme="xavier"))


def test_merge_1_tower_matches_transformers():
  vision = dict(TINY["vision_config"], spatial_merge_size=1)
  hf = make_hf_model(seed=0, vision_config=vision)
  with tempfile.TemporaryDirectory() as path:
    hf.save_pretrained(path)
    model = qwen2_5_vl.from_pretrained(path, dtype=jnp.float32)
  assert model.config.vision.spatial_merge_size == 1
  ids, mask, pv, thw = multimodal_batch([[(1, 4, 4), (1, 6, 10)], [(1, 9, 5)]], [2, 5], merge=1)
  ref = hf_logits(hf, ids, mask, pv, thw)
  got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                         pixel_values=jnp.asarray(pv), image_grid_thw=jnp.asarray(thw)).logits)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)


def test_training_pipeline_cuts_image_tokens_for_the_models_merge_size(tmp_path):
  config = cli.load_config(f"{CONFIGS}/grpo.py:cpu_demo")
  tokenizer = tokenizer_lib.load_named(config.tokenizer, str(tmp_path / "tokenizer"))
  records = train_lib.DATA_SOURCES["synthetic"](config.data)[:8]
  image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
  for merge in (1, 2):
    vision = dataclasses.replace(get_preset("cpu_demo").vision, spatial_merge_size=merge)
    batch = next(iter(train_lib.make_pipeline(config, records, tokenizer, batch_size=8, seed=0,
                                              vision=vision)))
    per_row = (np.asarray(batch["input_ids"]) == image_pad).sum(axis=1)
    # 56x56 px = 4x4 patches of 14 px: 16 tokens at merge 1, 4 at merge 2.
    np.testing.assert_array_equal(per_row, 16 // merge**2)


def test_configured_length_buckets_and_a_template_mixture_reach_the_training_pipeline(tmp_path):
  config = cli.load_config(f"{CONFIGS}/grpo.py:cpu_demo")
  tokenizer = tokenizer_lib.load_named(config.tokenizer, str(tmp_path / "tokenizer"))
  records = train_lib.DATA_SOURCES["synthetic"](config.data)[:64]
  vision = get_preset("cpu_demo").vision
  with config.unlocked():
    config.data.template = "plain|text_only"
    config.data.max_prompt_length = 80
    config.data.length_buckets = "40,56,80"
  widths = {np.asarray(b["input_ids"]).shape[1] for b, _ in zip(
      train_lib.make_pipeline(config, records, tokenizer, batch_size=8, seed=0, vision=vision),
      range(8))}
  assert widths <= {40, 56, 80} and 56 in widths  # 56: not a power of two
  image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
  batch = next(iter(train_lib.make_pipeline(config, records, tokenizer, batch_size=64, seed=0,
                                            vision=vision)))
  per_row = (np.asarray(batch["input_ids"]) == image_pad).sum(axis=1)
  assert 16 <= (per_row == 16).sum() <= 48 and set(per_row.tolist()) == {0, 16}
  with config.unlocked():
    config.data.length_buckets = "40,x"
  with pytest.raises(ValueError, match="data.length_buckets"):
    train_lib.make_pipeline(config, records, tokenizer, batch_size=8, seed=0, vision=vision)
