"""The README's main job: difficulty-prior GRPO on a tiny Qwen2.5-VL-shaped model, on CPU.

    python -m dprl.demo --workdir runs/demo [--config configs/grpo.py:cpu_demo] [--config.a.b=...]

Stages, each in its own folder of the workdir and skipped when already done (a killed run
resumes where it stopped: training resumes from its last Orbax checkpoint):
  1. warm_start/  a short supervised warm start on the synthetic colour-counting benchmark,
                  so that RL starts with signal (shared/docs/tiny-rl-facts.md);
  2. curate/      offline difficulty curation: K samples per training prompt with the
                  warm-started model, pass-rate histogram, always-right and never-right
                  prompts dropped (the difficulty prior's first step);
  3. grpo/        GRPO from the warm start on the curated prompts with difficulty-weighted
                  advantages, evaluating greedy accuracy on 500 held-out items every
                  `eval.every` steps;
then plots (`curves.png`, `curate/histogram.png`) and `summary.json`, and a table of held-out
accuracy before and after RL (after = mean of the last three evaluations, since a single
checkpoint of a tiny model swings by 10-25 points).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from dprl import cli
from dprl import metrics as metrics_lib
from dprl import plots
from dprl import train as train_lib

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "grpo.py"
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its outputs.")
_CONFIG = config_flags.DEFINE_config_file("config", f"{DEFAULT_CONFIG}:cpu_demo",
                                          "The GRPO config (configs/grpo.py:cpu_demo).",
                                          lock_config=True)
_CURATE_ITEMS = flags.DEFINE_integer("curate_items", 1200, "Training prompts scored by curation "
                                     "(and the pool GRPO trains on).")
_CURATE_SAMPLES = flags.DEFINE_integer("curate_samples", 8, "K samples per prompt in curation.")

log = logging.getLogger(__name__)


def warm_start_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.total_steps = 0
    c.eval.every = 0
  return c


def curate_config(config: ml_collections.ConfigDict, num_samples: int) -> ml_collections.ConfigDict:
  c = cli.load_config(str(DEFAULT_CONFIG.parent / "curate.py"))
  data = config.data
  c.template.names = data.template
  c.template.system_prompt = data.system_prompt or ""
  c.sampling.num_samples = num_samples
  c.sampling.max_new_tokens = config.sampling.max_new_tokens
  c.sampling.batch_size = 64
  c.sampling.min_pixels = data.min_pixels
  c.sampling.max_pixels = data.max_pixels
  c.sampling.max_prompt_length = data.max_prompt_length
  c.output.tfds = False  # the JSONL is what the GRPO stage reads
  c.progress = bool(config.logging.progress)
  return c


def grpo_config(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                curated: pathlib.Path | None) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.init_checkpoint = str(workdir / "warm_start")
    c.sft.steps = 0
    if curated is not None:
      c.eval.synthetic_tasks = c.eval.synthetic_tasks or c.data.tasks  # held-out items still
      c.data.source = "jsonl"
      c.data.path = str(curated)
      c.data.layout = "dprl"
  return c


def run_curation(config, workdir: pathlib.Path, num_items: int, num_samples: int) -> pathlib.Path | None:
  """Scores the training pool with the warm-started model; returns the kept prompts' JSONL
  (None when too few prompts are kept to fill a rollout batch: GRPO then uses them all)."""
  from dprl import curate as curate_lib  # pylint: disable=g-import-not-at-top
  from dprl.data.readers import read_records, write_jsonl  # pylint: disable=g-import-not-at-top
  out = workdir / "curate"
  kept_path = out / "kept.jsonl"
  cfg = curate_config(config, num_samples)
  if not kept_path.exists():
    with config.unlocked():
      config.data.num_items = num_items
    records = train_lib.DATA_SOURCES[config.data.source](config.data)
    tokenizer = train_lib.load_tokenizer(config.tokenizer, str(workdir / "warm_start"))
    with cfg.unlocked():
      cfg.init_checkpoint = str(workdir / "warm_start" / "checkpoints")
    model = curate_lib.load_model(cfg, tokenizer)
    report = curate_lib.curate(cfg, out, model=model, tokenizer=tokenizer, records=records)
    stages = [out / "stage1.jsonl", out / "stage2.jsonl"]
    kept = [r for path in stages if path.exists() for r in read_records(str(path), layout="dprl")]
    write_jsonl(kept, str(kept_path))
    log.info("curation kept %d of %d prompts", len(kept), report["num_records"])
  kept = sum(1 for _ in open(kept_path))
  if kept < config.data.rollout_batch_size:
    log.warning("curation kept only %d prompts (< data.rollout_batch_size = %d): GRPO trains "
                "on the whole pool instead", kept, config.data.rollout_batch_size)
    return None
  return kept_path


def summarize(workdir: pathlib.Path) -> dict[str, Any]:
  rows = metrics_lib.read_metrics(str(workdir / "grpo"))
  evals = [r for r in rows if "eval/accuracy" in r]
  if not evals:
    raise RuntimeError(f"{workdir / 'grpo'}: no eval/accuracy rows in metrics.jsonl")
  before = evals[0]
  last = evals[-3:]
  mean = lambda key, rs: sum(r.get(key, 0.0) for r in rs) / len(rs)
  levels = sorted({k for r in evals for k in r if k.startswith("eval/accuracy_level_")},
                  key=lambda k: k.rsplit("_", 1)[-1].zfill(4))
  summary = {
      "before_rl": {"step": before["step"], "accuracy": before["eval/accuracy"],
                    "stderr": before.get("eval/accuracy_stderr")},
      "after_rl": {"steps": [r["step"] for r in last], "accuracy": mean("eval/accuracy", last)},
      "by_level": {k.rsplit("_", 1)[-1]: {"before": before.get(k), "after": mean(k, last)}
                   for k in levels},
      "eval_curve": [{"step": r["step"], "accuracy": r["eval/accuracy"]} for r in evals],
  }
  summary["gain"] = summary["after_rl"]["accuracy"] - summary["before_rl"]["accuracy"]
  return summary


def print_summary(summary: dict[str, Any], workdir: pathlib.Path, elapsed: float) -> None:
  b, a = summary["before_rl"], summary["after_rl"]
  print("\nHeld-out greedy accuracy (500 synthetic test items)")
  print(f"{'':<14}{'before RL':>10}{'after RL':>10}")
  print(f"{'all':<14}{b['accuracy']:>10.3f}{a['accuracy']:>10.3f}   (after = mean of steps {a['steps']})")
  for level, v in summary["by_level"].items():
    before = "" if v["before"] is None else f"{v['before']:.3f}"
    print(f"{'  level ' + level:<14}{before:>10}{v['after']:>10.3f}")
  print(f"gain: {summary['gain']:+.3f} (one standard error ~{b['stderr'] or 0:.3f})")
  print(f"\nfinished in {elapsed / 60:.1f} min; outputs in {workdir}:")
  for name in ("summary.json", "curves.png", "curate/histogram.png", "grpo/metrics.jsonl",
               "grpo/checkpoints", "grpo/tensorboard"):
    print(f"  {workdir / name}")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  start = time.time()
  workdir = pathlib.Path(_WORKDIR.value)
  config = _CONFIG.value
  print(f"[1/3] warm start ({config.sft.steps} supervised steps) -> {workdir / 'warm_start'}")
  train_lib.train(warm_start_config(config), str(workdir / "warm_start"))
  print(f"[2/3] difficulty curation ({_CURATE_SAMPLES.value} samples x {_CURATE_ITEMS.value} prompts)"
        f" -> {workdir / 'curate'}")
  curated = run_curation(config, workdir, _CURATE_ITEMS.value, _CURATE_SAMPLES.value)
  print(f"[3/3] GRPO ({config.total_steps} steps, {config.rl.estimator} + "
        f"{config.rl.difficulty_weighting} difficulty weighting) -> {workdir / 'grpo'}")
  train_lib.train(grpo_config(config, workdir, curated), str(workdir / "grpo"))
  rows = metrics_lib.read_metrics(str(workdir / "grpo"))
  plots.plot_curves(rows, ["eval/accuracy", "accuracy", "reward_mean", "response_len"],
                    str(workdir / "curves.png"), window=5,
                    labels={"eval/accuracy": "held-out greedy accuracy",
                            "accuracy": "training accuracy (T=1)",
                            "reward_mean": "training reward"},
                    title="GRPO with difficulty-weighted advantages")
  summary = summarize(workdir)
  with open(workdir / "summary.json", "w") as f:
    json.dump(summary, f, indent=2)
  print_summary(summary, workdir, time.time() - start)


if __name__ == "__main__":
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  app.run(main)
