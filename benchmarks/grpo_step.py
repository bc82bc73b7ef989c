"""GRPO step throughput: a whole step (sampling + update) and the update alone, with the
update's achieved FLOP/s as a fraction of this machine's float32 matmul FLOP/s.

    python benchmarks/grpo_step.py [--quick] [--json out.json] [--configs tiny,small]

Each config runs in its own process on one CPU device with all cores (a
`--xla_force_host_platform_device_count` in XLA_FLAGS is dropped there), float32, built
as `dprl.train` builds a run (`_start`, `rollout_config`, `learner_config`, the pipeline)
from `configs/grpo.py:tiny` with the overrides below; the data are the synthetic
colour-counting prompts (one 56x56 image each, left-padded to 128 tokens).

  tiny   the `tiny` preset (2 layers, width 64), the small character tokenizer (vocab
         384), 8 prompts x 4 samples, 16 new tokens, micro-batches of 16 rows.
  small  a decoder of 4 layers, width 512 (MLP 1536, 8 query / 2 KV heads), vocab 32768,
         with the tiny preset's vision tower (out width 512); the same tokenizer and
         prompts; 2 prompts x 8 samples, 32 new tokens, one micro-batch of 16 rows.
         Random weights sample EOS with probability ~1/32768, so responses run to 32.

Measured after warm-up (the first step compiles the sampler and the update; compile_s
is that step's time minus a steady step's):
  step    `grpo_step` (sample, score, advantages, update): median time over the timed
          steps; tokens/s = prompt + response tokens (padding excluded, as grpo_step
          reports them) / time.
  update  `Learner.update` on one fixed rollout of the same shape (one optimizer update
          accumulated over micro-batches): median time, tokens/s as above.
  matmul  a jitted float32 2048x2048x2048 `jnp.dot`, best of several runs, in each config's
          process; the run's reference is the best over its processes.

Update FLOPs (per optimizer update = micro-batches x accumulate + apply):
  update_flops          matmul FLOPs (dot_general, conv) of the jaxprs of the jitted
                        accumulate and apply functions, after dead-code elimination (the
                        model's unused full-sequence logits), with each scan body times
                        its length: 2 x M x K x N per dot, the backward pass and the
                        rematerialised log-prob chunks included, elementwise work not.
                        update_flops_per_s and the fraction use this count.
  update_flops_xla      XLA's `cost_analysis()["flops"]` of the same lowered functions
                        (elementwise ops included). XLA counts a while loop's body once,
                        not once per iteration, and the decoder layers, the vision blocks
                        and the log-prob chunks are all scans, so this undercounts.
  update_flops_analytic per row of T = Tp + N positions (Tp padded prompt, N new tokens):
                          6 x (decoder matmul parameters) x T
                        + 12 x layers x T^2 x (heads x head_dim)     attention, full T x T
                        + 8 x D x V x ceil(N / chunk) x chunk       LM head, rematerialised
                        plus 6 x (vision matmul parameters) x patches (merger at patches/4);
                        vision attention and elementwise work omitted. It agrees with
                        update_flops within ~1% on both configs.
FLOPs count every position the update computes (prompt padding included); tokens/s counts
real tokens only.

--quick: fewer repeats, no warm-up update and half the small batch; about 1.5 minutes on
2 quiet CPU cores (most of it compiling), `--configs tiny` about one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import peak_rss_mb, print_table, run_isolated  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Model: None = the config's preset; else text/vision fields replacing the tiny preset's.
CONFIGS = {
    "tiny": dict(model=None, prompts=8, samples=4, new_tokens=16, micro_batch=16, chunk=16,
                 steps=5, updates=5),
    "small": dict(model=dict(
        text=dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, mrope_section=(4, 14, 14)),
        vision=dict(out_hidden_size=512)),
        prompts=2, samples=8, new_tokens=32, micro_batch=16, chunk=32, steps=3, updates=3),
}
# --quick: fewer repeats, no warm-up update (the steps compiled its shapes), and the small
# config's batch halved (8 rows, one micro-batch).
QUICK = {"tiny": dict(steps=2, updates=2, warmup_updates=0),
         "small": dict(prompts=1, micro_batch=8, steps=1, updates=1, warmup_updates=0)}
MATMUL_SIZE = 2048
SMALL_PRESET = "benchmark_small"


def _one_device_env() -> None:
  """One CPU device using all cores (before jax is imported)."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags).strip()
  if flags:
    os.environ["XLA_FLAGS"] = flags
  else:
    os.environ.pop("XLA_FLAGS", None)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ---------------------------------------------------------------------------------------
# FLOP counts
# ---------------------------------------------------------------------------------------


def matmul_flops(jaxpr) -> int:
  """dot_general + conv FLOPs of a jaxpr, scan bodies times their length, cond branches
  at their maximum, other sub-jaxprs (jit, remat, custom_vjp, while) once."""
  import numpy as np
  from jax.extend import core as jcore
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
      total += 2 * int(np.prod(lhs)) * int(np.prod(rhs_free))
    elif name == "conv_general_dilated":
      out, rhs = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2 * int(np.prod(out)) * int(np.prod(rhs)) // out_features
    else:
      subs = [matmul_flops(sub) for sub in jcore.jaxprs_in_params(eqn.params)]
      if not subs:
        continue
      if name == "scan":
        total += int(eqn.params["length"]) * sum(subs)
      elif name == "cond":
        total += max(subs)
      else:
        total += sum(subs)
  return total


def jaxpr_matmul_flops(fn, *args) -> int:
  """`matmul_flops` of fn(*args) after dead-code elimination."""
  import jax
  from jax._src.interpreters import partial_eval as pe  # dce_jaxpr has no public home
  closed = jax.make_jaxpr(fn)(*args)
  jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return matmul_flops(jaxpr)


def xla_flops(fn, *args) -> float | None:
  """XLA's cost analysis of the lowered fn (loop bodies counted once), or None."""
  try:
    cost = fn.lower(*args).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def analytic_update_flops(params, cfg, rows: int, prompt_len: int, new_tokens: int, chunk: int,
                          patches: int) -> dict[str, float]:
  """The formula of the module docstring, from the parameter shapes; per optimizer update.

  rows: rows of the update; patches: vision patches over all its micro-batches (padded).
  """
  import jax
  import numpy as np
  sizes = {"decoder": 0, "head": 0, "vision": 0, "merger": 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if "embed_tokens" in name or np.ndim(leaf) < 2 or "scale" in name or "bias" in name:
      continue
    if "lm_head" in name:
      sizes["head"] += leaf.size
    elif "merger" in name:
      sizes["merger"] += leaf.size
    elif "visual" in name:
      sizes["vision"] += leaf.size
    else:
      sizes["decoder"] += leaf.size
  t = cfg.text
  if cfg.tie_word_embeddings:
    sizes["head"] = t.vocab_size * t.hidden_size
  positions = prompt_len + new_tokens
  logit_positions = -(-new_tokens // min(chunk, new_tokens)) * min(chunk, new_tokens)
  parts = {
      "decoder": 6 * sizes["decoder"] * rows * positions,
      "attention": 12 * t.num_hidden_layers * rows * positions**2
                   * t.num_attention_heads * t.head_dim,
      "head": 8 * sizes["head"] * rows * logit_positions,
      "vision": 6 * (sizes["vision"] * patches + sizes["merger"] * patches // 4),
  }
  parts["total"] = sum(parts.values())
  return {k: float(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------
# The measurement (child process)
# ---------------------------------------------------------------------------------------


def matmul_rate(size: int, repeats: int) -> float:
  """float32 FLOP/s of a jitted size^3 jnp.dot, best of `repeats` runs after a warm-up."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def _load_grpo_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("grpo_config", os.path.join(ROOT, "configs", "grpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


def _run_config(spec: dict):
  """configs/grpo.py:tiny with the benchmark's overrides (the config stays locked)."""
  import dataclasses
  from dprl.models import config as model_config
  config = _load_grpo_config()
  if spec["model"] is not None:
    tiny = model_config.get_preset("tiny")
    model_config.PRESETS[SMALL_PRESET] = tiny.replace(
        text=dataclasses.replace(tiny.text, **spec["model"]["text"]),
        vision=dataclasses.replace(tiny.vision, **spec["model"]["vision"]))
    config.model.preset = SMALL_PRESET
  config.data.rollout_batch_size = spec["prompts"]
  config.sampling.num_samples = spec["samples"]
  config.sampling.max_new_tokens = spec["new_tokens"]
  config.rl.micro_batch_size = spec["micro_batch"]
  config.rl.chunk_size = spec["chunk"]
  config.rl.num_iterations = 1
  config.rl.update_batch_size = 0
  config.rl.beta = 0.0
  config.sft.steps = 0
  config.total_steps = 1000
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  config.logging.progress = False
  config.logging.tensorboard = False
  return config


def learner_model_config(run):
  """The run's ModelConfig (the preset with the tokenizer's vocabulary and ids)."""
  from dprl.models.config import from_hf_dict
  return from_hf_dict(run.meta["model_config"], "run meta")


def child(name: str, quick: bool) -> dict:
  import jax
  import numpy as np
  from flax import nnx
  from dprl import train
  from dprl.models.qwen2_5_vl import frame_patch_bound
  from dprl.parallel.mesh import make_mesh
  from dprl.rl import checkpointing
  from dprl.rl import learner as learner_lib

  spec = {**CONFIGS[name], **(QUICK[name] if quick else {})}
  config = _run_config(spec)
  with tempfile.TemporaryDirectory() as workdir:
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tokenizer = train.load_tokenizer(config.tokenizer, workdir)
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              save_every=10**6, max_to_keep=1, async_save=False)
    try:
      run = train._start(config, workdir, mesh, tokenizer, checkpointer)  # pylint: disable=protected-access
    finally:
      checkpointer.close()
  learner, state, batches = run.learner, run.state, run.batches
  rollout_cfg = train.rollout_config(config, tokenizer)
  step_cfg = learner_lib.StepConfig(num_iterations=1, update_batch_size=0, beta=0.0)

  # Whole steps: the first compiles.
  steps = []
  for _ in range(1 + spec["steps"]):
    state, metrics = learner_lib.grpo_step(learner, state, None, batches, rollout_cfg, step_cfg,
                                           tokenizer)
    steps.append(metrics)
  first, timed = steps[0], steps[1:]
  step_s = statistics.median(m["step_time_s"] for m in timed)

  # The update alone, on one fixed rollout (shapes as in the steps: compiled already).
  model = nnx.merge(learner.graphdef, state.params, learner.rest)
  groups, _ = learner_lib.collect_groups(model, batches, jax.random.fold_in(state.rng, 10**6),
                                         rollout_cfg, tokenizer, mesh=learner.mesh)
  del model
  rollout = learner_lib.rollout_from_groups(groups)
  tokens = int(rollout.prompt_mask.sum() + rollout.response_mask.sum())
  warmup = spec.get("warmup_updates", 1)
  update_times = []
  for i in range(warmup + spec["updates"]):
    start = time.perf_counter()
    state, metrics = learner.update(state, rollout, loss_name="grpo")
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      update_times.append(time.perf_counter() - start)
  update_s = statistics.median(update_times)
  count_start = time.perf_counter()

  # FLOPs of one update: micro-batches x accumulate + apply.
  micro = min(learner.config.micro_batch_size, rollout.num_rows)
  num_micro = rollout.num_rows // micro
  host = rollout.micro_batch(slice(0, micro), patch_dim=learner.patch_dim,
                             merge_size=learner.merge_size)
  batch = learner.put_batch(host)
  keys = tuple(sorted(batch))
  acc = learner.zero_acc(state.params, batch, "grpo")
  accumulate = learner.jitted("accumulate", keys, "grpo", frame_patch_bound(host.get("image_grid_thw")))
  apply = learner.jitted("apply", keys, "grpo")
  flops = (num_micro * jaxpr_matmul_flops(accumulate, state.params, batch, acc)
           + jaxpr_matmul_flops(apply, state, acc))
  xla_acc, xla_apply = xla_flops(accumulate, state.params, batch, acc), xla_flops(apply, state, acc)
  flops_xla = (num_micro * xla_acc + xla_apply) if xla_acc is not None and xla_apply is not None else None
  patches = num_micro * (len(host["pixel_values"]) if "pixel_values" in host else 0)
  analytic = analytic_update_flops(state.params, learner_model_config(run), rollout.num_rows,
                                   rollout.prompt_ids.shape[1], rollout.response_ids.shape[1],
                                   learner.config.chunk_size, patches)

  flop_count_s = time.perf_counter() - count_start
  matmul = matmul_rate(MATMUL_SIZE, 3 if quick else 5)
  text = learner_model_config(run).text
  param_count = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
  return dict(
      prompts=spec["prompts"], samples=spec["samples"], rows=rollout.num_rows,
      new_tokens=spec["new_tokens"], micro_batch=micro, prompt_len=int(rollout.prompt_ids.shape[1]),
      layers=text.num_hidden_layers, width=text.hidden_size, vocab=text.vocab_size,
      params_m=param_count / 1e6,
      step_s=step_s, sample_s=statistics.median(m["sample_time_s"] for m in timed),
      step_tokens=statistics.median(m["tokens"] for m in timed),
      step_tokens_per_s=statistics.median(m["tokens_per_s"] for m in timed),
      response_len=statistics.median(m["response_len"] for m in timed),
      compile_s=first["step_time_s"] - step_s,
      update_s=update_s, update_tokens=tokens, update_tokens_per_s=tokens / update_s,
      update_flops=float(flops), update_flops_xla=flops_xla,
      update_flops_analytic=analytic["total"], update_flops_analytic_parts=analytic,
      update_flops_per_s=flops / update_s,
      matmul_flops_per_s=matmul, peak_rss_mb=peak_rss_mb(), timed_steps=len(timed),
      timed_updates=len(update_times), flop_count_s=flop_count_s)


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats; under two minutes")
  parser.add_argument("--json", help="write results here")
  parser.add_argument("--configs", default="tiny,small")
  parser.add_argument("--child", nargs=2, metavar=("CONFIG", "QUICK"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _one_device_env()
    name, quick = args.child
    print("RESULT:" + json.dumps(child(name, quick == "1")))
    return
  names = [n.strip() for n in args.configs.split(",") if n.strip()]
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    parser.error(f"unknown configs {unknown}; known: {sorted(CONFIGS)}")
  runs = {name: run_isolated(__file__, ["--child", name, "1" if args.quick else "0"]) for name in names}
  matmul = max(r["matmul_flops_per_s"] for r in runs.values())
  results, rows = {}, []
  for name, res in runs.items():
    res = dict(res, update_fraction_of_matmul=res["update_flops_per_s"] / matmul,
               process_matmul_flops_per_s=res.pop("matmul_flops_per_s"))
    results[name] = res
    rows.append({"config": name, **res, "update_gflop": res["update_flops"] / 1e9,
                 "analytic_gflop": res["update_flops_analytic"] / 1e9,
                 "xla_gflop": None if res["update_flops_xla"] is None else res["update_flops_xla"] / 1e9,
                 "update_gflop_per_s": res["update_flops_per_s"] / 1e9})
  print_table(rows, ["config", "params_m", "rows", "step_tokens", "step_s", "sample_s",
                     "step_tokens_per_s", "update_s", "update_tokens_per_s", "update_gflop",
                     "analytic_gflop", "xla_gflop", "update_gflop_per_s",
                     "update_fraction_of_matmul", "compile_s"])
  print(f"float32 matmul ({MATMUL_SIZE}^3 jnp.dot, best of runs): {matmul / 1e9:.1f} GFLOP/s "
        f"on {os.cpu_count()} CPUs")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"configs": results, "matmul_flops_per_s": matmul, "matmul_size": MATMUL_SIZE,
                 "quick": args.quick, "cpu_count": os.cpu_count()}, f, indent=2)


if __name__ == "__main__":
  main()
