"""Sampler on an accelerator: a released checkpoint's shapes in bfloat16, random weights.

Where `benchmarks/sampler.py` compares engines on CPU at toy sizes, this measures what
decoding at real size costs on a GPU (or TPU): tokens per second of `dprl.sampling.generate`
on a random-weight model with the preset's shapes (Qwen2.5-VL-3B by default), each prompt
an image plus text, G samples a prompt, no early stop, and how close decoding comes to the
memory bandwidth it needs.

Decode is memory-bound at these batch sizes: each step reads every decoder weight, the LM
head and the KV cache once. So

    decode step time       = (t(N new tokens) - t(1 new token)) / (N - 1)
    bytes a step must read = decoder layers + final norm + LM head + the KV cache
                             (all S slots: the step attends over the whole preallocated cache)
    achieved bandwidth     = bytes / step time, as a fraction of the device's copy bandwidth
                             measured in the same run (read + write of a 4 GiB buffer)

With `--reference transformers` the same shapes run through transformers' `generate`
(bfloat16, sdpa attention, its own random weights: throughput does not depend on the
values when every row runs to N tokens) on the same device, for a ratio in the same run.

    python benchmarks/sampler_device.py [--preset qwen2_5_vl_3b] [--prompts 8] [--samples 8]
        [--new_tokens 256] [--reference transformers] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table  # noqa: E402


def copy_bandwidth(gib: float, repeats: int = 10) -> float:
  """Bytes per second of a device-to-device copy (read + write counted)."""
  import jax
  import jax.numpy as jnp
  n = int(gib * 2**30) // 2
  x = jnp.ones((n,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))
  jax.block_until_ready(copy(x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(copy(x))
    times.append(time.perf_counter() - t0)
  return 2 * n * 2 / min(times)


def prompts(cfg, num_prompts: int, image_px: int, prompt_text: int, seed: int = 0):
  """Left-aligned prompts of one image (image_px square) and `prompt_text` text tokens each:
  (input_ids [P, T], attention_mask, pixel_values [P * patches, patch_dim], image_grid_thw)."""
  v = cfg.vision
  side = image_px // v.patch_size
  side -= side % v.spatial_merge_size
  grid = (1, side, side)
  image_tokens = side * side // v.spatial_merge_size**2
  rng = np.random.default_rng(seed)
  row = [cfg.vision_start_token_id] + [cfg.image_token_id] * image_tokens + [cfg.vision_end_token_id]
  ids = np.stack([np.array(row + list(rng.integers(0, min(1000, cfg.vision_start_token_id), prompt_text))) for _ in range(num_prompts)])
  pv = rng.standard_normal((num_prompts * side * side, v.patch_dim)).astype(np.float32)
  thw = np.array([grid] * num_prompts, np.int64)
  return ids.astype(np.int32), np.ones_like(ids, np.int32), pv, thw


def decode_bytes(cfg, model, rows: int, slots: int) -> dict[str, int]:
  """Bytes one decode step reads: decoder weights (+ LM head) and the whole KV cache."""
  import jax
  from flax import nnx
  text = cfg.text
  layer_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.model.layers)))
  norm_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.model.norm)))
  head = model.model.embed_tokens.embedding if model.lm_head is None else model.lm_head
  head_bytes = int(np.prod(head.shape)) * np.dtype(cfg.dtype).itemsize
  kv_bytes = 2 * text.num_hidden_layers * rows * slots * text.num_key_value_heads * text.head_dim * np.dtype(
      cfg.dtype).itemsize
  return dict(weights=layer_bytes + norm_bytes + head_bytes, kv_cache=kv_bytes)


def time_call(fn, repeats: int) -> tuple[float, float]:
  """(first call's seconds: compile + run, fastest of `repeats` further calls) of
  `fn(seed)`, which must return only once the device has finished its work."""
  t0 = time.perf_counter()
  fn(0)
  first = time.perf_counter() - t0
  times = []
  for seed in range(1, repeats + 1):
    t0 = time.perf_counter()
    fn(seed)
    times.append(time.perf_counter() - t0)
  return first, min(times)


def run_dprl(args, bandwidth: float) -> dict:
  import jax
  import jax.numpy as jnp
  from dprl.models import qwen2_5_vl
  from dprl.models.config import get_preset
  from dprl.sampling import generate, prompt_width
  cfg = dataclasses.replace(get_preset(args.preset), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  t0 = time.perf_counter()
  model = qwen2_5_vl.init(cfg, seed=0)
  jax.block_until_ready(jax.tree.leaves(model))
  init_s = time.perf_counter() - t0
  ids, mask, pv, thw = prompts(cfg, args.prompts, args.image_px, args.prompt_text)
  rows = args.prompts * args.samples

  def run(new_tokens):
    return lambda seed: jax.block_until_ready(generate(
        model, ids, mask, pv, thw, max_new_tokens=new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, num_samples=args.samples, seed=seed, eos_token_id=()))

  first_1, t_1 = time_call(run(1), args.repeats)
  first_n, t_n = time_call(run(args.new_tokens), args.repeats)
  step = (t_n - t_1) / (args.new_tokens - 1)
  slots = prompt_width(ids.shape[1]) + args.new_tokens
  need = decode_bytes(cfg, model, rows, slots)
  achieved = (need["weights"] + need["kv_cache"]) / step
  return dict(engine="dprl", rows=rows, prompt_tokens=ids.shape[1], new_tokens=args.new_tokens,
              tokens_per_s=rows * args.new_tokens / t_n, seconds=t_n, prefill_and_first_token_s=t_1,
              decode_step_ms=step * 1e3, weight_gib=need["weights"] / 2**30, kv_cache_gib=need["kv_cache"] / 2**30,
              achieved_gb_per_s=achieved / 1e9, bandwidth_fraction=achieved / bandwidth,
              compile_s=(first_1 - t_1) + (first_n - t_n), init_s=init_s,
              peak_device_gib=_peak_device_gib())


def run_transformers(args) -> dict:
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  from dprl.models.config import get_preset, to_hf_dict
  cfg = get_preset(args.preset)
  hf_config = Qwen2_5_VLConfig(**to_hf_dict(cfg))
  hf_config._attn_implementation = "sdpa"
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  with device:  # built in float32 on the device, then cast (built in bfloat16, some buffers stay float32)
    model = Qwen2_5_VLForConditionalGeneration(hf_config).to(torch.bfloat16).eval()
  ids, mask, pv, thw = prompts(cfg, args.prompts, args.image_px, args.prompt_text)
  rows = args.prompts * args.samples
  as_t = lambda a: torch.from_numpy(np.asarray(a)).to(device)
  mm = (ids == cfg.image_token_id).astype(np.int64)

  sampling = (dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
              if args.temperature > 0 else dict(do_sample=False))

  def run(new_tokens):
    def call(seed):
      torch.manual_seed(seed)
      with torch.no_grad():
        out = model.generate(input_ids=as_t(ids.astype(np.int64)), attention_mask=as_t(mask.astype(np.int64)),
                             pixel_values=as_t(pv).to(torch.bfloat16), image_grid_thw=as_t(thw),
                             mm_token_type_ids=as_t(mm), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             **sampling, pad_token_id=0,
                             num_return_sequences=args.samples)
      if device.type == "cuda":
        torch.cuda.synchronize()
      return out
    return call

  new_tokens = args.reference_new_tokens or args.new_tokens
  _, t_1 = time_call(run(1), args.repeats)
  _, t_n = time_call(run(new_tokens), args.repeats)
  step = (t_n - t_1) / (new_tokens - 1)
  return dict(engine="transformers", rows=rows, prompt_tokens=ids.shape[1], new_tokens=new_tokens,
              tokens_per_s=rows * new_tokens / t_n, seconds=t_n, prefill_and_first_token_s=t_1,
              decode_step_ms=step * 1e3,
              peak_device_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def _peak_device_gib() -> float | None:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="qwen2_5_vl_3b")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--samples", type=int, default=8, help="G: samples per prompt")
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--image_px", type=int, default=224, help="square image side (224: 64 image tokens)")
  parser.add_argument("--prompt_text", type=int, default=48, help="text tokens after the image")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--reference", choices=["none", "transformers"], default="none")
  parser.add_argument("--reference_new_tokens", type=int, default=0,
                      help="transformers' N if not --new_tokens (then compare decode_step_ms, not tokens/s)")
  parser.add_argument("--bandwidth_gib", type=float, default=4.0,
                      help="buffer of the copy-bandwidth measurement (several times the L2)")
  parser.add_argument("--json", help="write results here")
  args = parser.parse_args()
  import jax
  device = jax.devices()[0]
  bandwidth = copy_bandwidth(args.bandwidth_gib)
  results = [run_dprl(args, bandwidth)]
  if args.reference == "transformers":
    results.append(run_transformers(args))
  print(f"device: {device.device_kind} ({device.platform}); copy bandwidth {bandwidth / 1e9:.0f} GB/s")
  print_table(results, ["engine", "rows", "prompt_tokens", "new_tokens", "tokens_per_s", "decode_step_ms",
                        "prefill_and_first_token_s", "weight_gib", "kv_cache_gib", "achieved_gb_per_s",
                        "bandwidth_fraction", "compile_s", "peak_device_gib"])
  summary = dict(device=device.device_kind, platform=device.platform, preset=args.preset,
                 sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
                 copy_bandwidth_gb_per_s=bandwidth / 1e9, results=results)
  if len(results) == 2:
    summary["decode_step_speedup_vs_transformers"] = results[1]["decode_step_ms"] / results[0]["decode_step_ms"]
    summary["tokens_per_s_speedup_vs_transformers"] = results[0]["tokens_per_s"] / results[1]["tokens_per_s"]
    print(f"decode step: {summary['decode_step_speedup_vs_transformers']:.2f}x transformers'; "
          f"tokens/s: {summary['tokens_per_s_speedup_vs_transformers']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  main()
