"""Memory of RAP's attention confidence (ACE): query-chunked against the whole-layer read.

Compiles `dprl.curation.attention_confidence`'s jitted teacher-forced pass both ways on a
small random text decoder, a prompt and a long response (T = 1024 in all by default), and
prints XLA's memory analysis of each compiled function: temporaries (the peak of live
intermediates), arguments (the weights and inputs), outputs. Nothing is run, so it is
quick on a CPU; the numbers are XLA's plan for the backend it compiles for.

    python benchmarks/ace_memory.py [--prompt 64] [--response 960] [--batch 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table  # noqa: E402

# A small decoder with the 7B's head layout ratio (GQA 4:1) and few layers.
TEXT = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, mrope_section=(4, 14, 14))


def measure(prompt: int, response: int, batch: int, chunks: list[int | None]) -> list[dict]:
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from dprl.curation import attention_confidence as ace
  from dprl.models import qwen2_5_vl
  from dprl.models.config import get_preset

  tiny = get_preset("tiny")
  cfg = tiny.replace(text=dataclasses.replace(tiny.text, **TEXT), image_token_id=4090,
                     vision=dataclasses.replace(tiny.vision, out_hidden_size=TEXT["hidden_size"]),
                     video_token_id=4091, vision_start_token_id=4088, vision_end_token_id=4089)
  model = qwen2_5_vl.abstract(cfg)  # shapes only: nothing is allocated or run
  graphdef, state = nnx.split(model)
  args = (state, jax.ShapeDtypeStruct((batch, prompt), jnp.int32),
          jax.ShapeDtypeStruct((batch, prompt), jnp.int32),
          jax.ShapeDtypeStruct((batch, response), jnp.int32),
          jax.ShapeDtypeStruct((batch, response), jnp.int32), None, None)
  t = prompt + response
  h = cfg.text.num_attention_heads
  rows = []
  for chunk in chunks:
    compiled = ace.jitted_log_psi(graphdef, cfg.text.num_hidden_layers - 1, 2.0, chunk).lower(
        *args).compile()
    stats = compiled.memory_analysis()
    rows.append({
        "path": "whole layer [B,H,T,T]" if chunk is None else f"chunked, {chunk} queries",
        "query_chunk": chunk,
        "temp_MiB": stats.temp_size_in_bytes / 2**20,
        "args_MiB": stats.argument_size_in_bytes / 2**20,
        "out_MiB": stats.output_size_in_bytes / 2**20,
        "bound_MiB": 4 * batch * h * t * (t if chunk is None else min(chunk, response)) / 2**20,
    })
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--response", type=int, default=960)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--chunks", default="none,512,128,32")
  parser.add_argument("--json", default="")
  a = parser.parse_args()
  chunks = [None if c == "none" else int(c) for c in a.chunks.split(",")]
  rows = measure(a.prompt, a.response, a.batch, chunks)
  print(f"ACE memory, B={a.batch}, T={a.prompt + a.response} (prompt {a.prompt}, response "
        f"{a.response}), text decoder {TEXT['num_hidden_layers']} layers x "
        f"{TEXT['num_attention_heads']} heads, float32; bound = 4*B*H*T*(T or chunk) bytes")
  print_table(rows, ["path", "temp_MiB", "bound_MiB", "args_MiB", "out_MiB"])
  if a.json:
    with open(a.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
