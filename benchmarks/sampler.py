"""Sampler throughput: dprl's jitted generate against transformers' generate.

Same random-weight checkpoint, batch, prompt (one image + text) and new-token lengths,
float32, sampling at temperature 1 with no top-k/top-p, no early stop; each engine in
its own process with the same CPU threads; timed after a warm-up run; dprl's compile
time is reported apart.

Noise: a shared machine's load moves single timings by more than the targets' margins
(one engine can run while a neighbour is busy and the other while it is idle). So each
child times `--repeats` runs and reports its fastest, and the engines run in
alternating rounds (dprl, transformers, dprl, transformers, ...), each engine's best
round kept: the ratio then compares both engines at their least disturbed.

    python benchmarks/sampler.py [--quick] [--rounds 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import peak_rss_mb, print_table, run_isolated  # noqa: E402

# Text sizes; the vision tower is the tiny one in both (prompts carry a 112x112 image).
CONFIGS = {
    "tiny": dict(text=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, mrope=[2, 3, 3]),
                 batch=16, prompt_text=16, new_tokens=64),
    "small": dict(text=dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2, mrope=[4, 14, 14]),
                  batch=64, prompt_text=32, new_tokens=128),
}
QUICK = {"tiny": dict(batch=8, new_tokens=32), "small": dict(batch=16, new_tokens=32)}
IMAGE_GRID = (1, 8, 8)  # 112x112 px: 64 patches, 16 image tokens


def _hf_config(name: str):
  from transformers import Qwen2_5_VLConfig
  t = dict(CONFIGS[name]["text"])
  mrope = t.pop("mrope")
  return Qwen2_5_VLConfig(
      text_config=dict(**t, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}),
      vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                         out_hidden_size=t["hidden_size"], fullatt_block_indexes=[1]),
      image_token_id=t["vocab_size"] - 10, video_token_id=t["vocab_size"] - 9,
      vision_start_token_id=t["vocab_size"] - 12, vision_end_token_id=t["vocab_size"] - 11)


def _inputs(cfg, batch, prompt_text):
  import numpy as np
  rng = np.random.default_rng(0)
  n_img = IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2] // 4
  row = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
  ids = np.stack([np.array(row + list(rng.integers(0, cfg.text_config.vocab_size - 20, prompt_text)))
                  for _ in range(batch)]).astype(np.int64)
  mask = np.ones_like(ids)
  pv = rng.standard_normal((batch * 64, 3 * 2 * 14 * 14)).astype(np.float32)
  thw = np.array([IMAGE_GRID] * batch, np.int64)
  return ids, mask, pv, thw


def child(engine: str, name: str, ckpt: str, batch: int, new_tokens: int, repeats: int) -> dict:
  import numpy as np
  cfg = _hf_config(name)
  ids, mask, pv, thw = _inputs(cfg, batch, CONFIGS[name]["prompt_text"])
  if engine == "transformers":
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.set_num_threads(os.cpu_count())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()
    kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(thw),
              mm_token_type_ids=torch.from_numpy((ids == cfg.image_token_id).astype(np.int64)),
              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0,
              top_k=0, top_p=1.0, pad_token_id=0)
    with torch.no_grad():
      model.generate(**{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(**kw)
        times.append(time.perf_counter() - t0)
    elapsed = min(times)
    assert out.shape[1] - ids.shape[1] == new_tokens
    compile_s = 0.0
  else:
    import jax
    from dprl.models import qwen2_5_vl
    from dprl.sampling import generate
    model = qwen2_5_vl.from_pretrained(ckpt)
    run = lambda seed: generate(model, ids, mask, pv, thw, max_new_tokens=new_tokens, temperature=1.0,
                                seed=seed, eos_token_id=())
    t0 = time.perf_counter()
    jax.block_until_ready(run(0))  # compile + first run
    first = time.perf_counter() - t0
    times = []
    for seed in range(1, repeats + 1):
      t0 = time.perf_counter()
      out = jax.block_until_ready(run(seed))
      times.append(time.perf_counter() - t0)
    elapsed = min(times)
    assert int(out.lengths.min()) == new_tokens
    compile_s = first - times[0]
  return dict(tokens_per_s=batch * new_tokens / elapsed, seconds=elapsed, compile_s=compile_s,
              peak_rss_mb=peak_rss_mb(), all_seconds=times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="smaller batches; under two minutes")
  parser.add_argument("--json", help="write results here")
  parser.add_argument("--configs", default="tiny,small")
  parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each engine")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs inside each child")
  parser.add_argument("--child", nargs=6, metavar=("ENGINE", "CONFIG", "CKPT", "BATCH", "NEW", "REPEATS"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    engine, name, ckpt, batch, new, repeats = args.child
    print("RESULT:" + json.dumps(child(engine, name, ckpt, int(batch), int(new), int(repeats))))
    return
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  results, rows = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.configs.split(","):
      spec = {**CONFIGS[name], **(QUICK[name] if args.quick else {})}
      ckpt = os.path.join(tmp, name)
      torch.manual_seed(0)
      Qwen2_5_VLForConditionalGeneration(_hf_config(name)).save_pretrained(ckpt)
      rounds = {"dprl": [], "transformers": []}
      for _ in range(max(args.rounds, 1)):
        for engine, results_of in rounds.items():
          results_of.append(run_isolated(__file__, [
              "--child", engine, name, ckpt, str(spec["batch"]), str(spec["new_tokens"]),
              str(max(args.repeats, 1))]))
      runs = {e: max(rs, key=lambda r: r["tokens_per_s"]) for e, rs in rounds.items()}
      res = dict(batch=spec["batch"], new_tokens=spec["new_tokens"],
                 dprl_tokens_per_s=runs["dprl"]["tokens_per_s"],
                 transformers_tokens_per_s=runs["transformers"]["tokens_per_s"],
                 speedup_vs_transformers=runs["dprl"]["tokens_per_s"] / runs["transformers"]["tokens_per_s"],
                 dprl_compile_s=runs["dprl"]["compile_s"],
                 peak_rss_mb=runs["dprl"]["peak_rss_mb"],
                 transformers_peak_rss_mb=runs["transformers"]["peak_rss_mb"],
                 rounds_tokens_per_s={e: [r["tokens_per_s"] for r in rs] for e, rs in rounds.items()})
      results[name] = res
      rows.append({"config": name, **res})
  print_table(rows, ["config", "batch", "new_tokens", "dprl_tokens_per_s", "transformers_tokens_per_s",
                     "speedup_vs_transformers", "dprl_compile_s", "peak_rss_mb", "transformers_peak_rss_mb"])
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"configs": results, "quick": args.quick, "cpu_count": os.cpu_count(),
                 "rounds": args.rounds, "repeats": args.repeats,
                 "load_average": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
  main()
