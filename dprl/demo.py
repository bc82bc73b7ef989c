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
accuracy before and after RL, greedy and sampled at temperature 1 (4 samples per item; RL
moves the sampled policy first, the greedy answers later); after = the mean of the last
three evaluations, since a single checkpoint of a tiny model swings by 10-25 points.
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
def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The demo's flags; defined by the entry point, not on import, so that other entry
  points (dprl.sweep, dprl.select) and tests can import this module beside their own
  --config."""
  flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its outputs.",
                      flag_values=flag_values)
  config_flags.DEFINE_config_file("config", f"{DEFAULT_CONFIG}:cpu_demo",
                                  "The GRPO config (configs/grpo.py:cpu_demo).",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_integer("curate_items", 1200, "Training prompts scored by curation (and the "
                       "pool GRPO trains on).", flag_values=flag_values)
  flags.DEFINE_integer("curate_samples", 8, "K samples per prompt in curation.",
                       flag_values=flag_values)
  flags.DEFINE_integer("warm_start_tries", 4, "Warm starts tried (seed, seed + 1, ...) until "
                       "one reads the image.", flag_values=flag_values)
  flags.DEFINE_float("warm_start_margin", 0.05, "A warm start must beat always giving the "
                     "most common answer by this much greedy accuracy on 200 training "
                     "prompts.", flag_values=flag_values)


PROBE_ITEMS = 200

log = logging.getLogger(__name__)


def warm_start_config(config: ml_collections.ConfigDict, attempt: int = 0) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.total_steps = 0
    c.eval.every = 0
    c.seed = config.seed + attempt  # the model's random init
  return c


def probe_warm_start(config: ml_collections.ConfigDict, directory: pathlib.Path) -> dict[str, Any]:
  """Greedy accuracy of the warm-started model on PROBE_ITEMS training prompts against the
  rate of always giving their most common answer.

  Why: from a random init the warm start lands in one of two basins, by chance (2 of 5
  seeds here took the second): the decoder reads the image, or it learns the answer
  prior and ignores the image for good (more steps or a higher learning rate did not
  leave it: 200 steps, or lr 3e-3, stayed at the prior). RL cannot repair the second,
  since every sample then ignores the image too.
  """
  import collections  # pylint: disable=g-import-not-at-top
  from dprl.evaluation.metrics import summarize  # pylint: disable=g-import-not-at-top
  from dprl.evaluation.rollout import rollout_records  # pylint: disable=g-import-not-at-top
  from dprl.data.templates import TemplateConfig  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dprl.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  data = config.data
  probe_config = config.copy_and_resolve_references()
  with probe_config.unlocked():
    probe_config.model.init_checkpoint = str(directory)
    probe_config.data.num_items = PROBE_ITEMS
    if "language_prior_fraction" in probe_config.data:
      # Items answerable without the image would let a model that ignores it pass
      # (measured: 0.355 against a most common answer of 0.265, counting at chance).
      probe_config.data.language_prior_fraction = 0.0
  records = train_lib.DATA_SOURCES[data.source](probe_config.data)
  tokenizer = train_lib.load_tokenizer(config.tokenizer, str(directory))
  import jax  # pylint: disable=g-import-not-at-top
  one_device = make_mesh(1, 1, 1, devices=jax.devices()[:1])  # a probe, not a sharded run
  _, graphdef, params, rest = train_lib.init_model(probe_config, tokenizer, one_device, None)
  # A template mixture ("plain|caption|text_only") is probed on its first alternative
  # alone, the one with the image: captions and text renditions say the answer in words.
  names = TemplateConfig(names=data.template).names
  results = rollout_records(
      nnx.merge(graphdef, params, rest), tokenizer, records,
      template=TemplateConfig(names=names, system_prompt=data.system_prompt),
      num_samples=1, temperature=0.0, max_new_tokens=config.sampling.max_new_tokens,
      batch_size=100, min_pixels=data.min_pixels, max_pixels=data.max_pixels, progress=False)
  accuracy = float(summarize(results)["accuracy"])
  majority = collections.Counter(r.answer for r in records).most_common(1)[0][1] / len(records)
  return {"accuracy": accuracy, "majority_answer_rate": majority}


def run_warm_start(config: ml_collections.ConfigDict, workdir: pathlib.Path, tries: int,
                   margin: float) -> None:
  """Warm starts into workdir/warm_start until one reads the image (`probe_warm_start`);
  a failed try is kept as warm_start.failed<k>/ (nothing is deleted)."""
  directory = workdir / "warm_start"
  probe_file = directory / "probe.json"
  if probe_file.exists() and json.loads(probe_file.read_text())["passed"]:
    return
  first = len(list(workdir.glob("warm_start.failed*")))  # tries of an earlier run
  for attempt in range(first, max(tries, first + 1)):
    train_lib.train(warm_start_config(config, attempt), str(directory))
    probe = probe_warm_start(config, directory)
    probe.update(attempt=attempt, seed=config.seed + attempt,
                 passed=probe["accuracy"] >= probe["majority_answer_rate"] + margin)
    probe_file.write_text(json.dumps(probe, indent=2))
    print(f"      warm start {attempt + 1}: greedy accuracy {probe['accuracy']:.3f} on "
          f"{PROBE_ITEMS} training prompts, most common answer {probe['majority_answer_rate']:.3f}"
          + ("" if probe["passed"] else " -> it ignores the image; trying the next seed"))
    if probe["passed"]:
      return
    directory.rename(workdir / f"warm_start.failed{attempt}")
  raise RuntimeError(f"none of {tries} warm starts beat the most common answer by "
                     f"{margin} (see {workdir}/warm_start.failed*/probe.json); raise "
                     "--warm_start_tries or sft.steps")


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


METRICS = (("eval/", "greedy"), ("eval_sampled/", "sampled (T=1)"))


def summarize(workdir: pathlib.Path) -> dict[str, Any]:
  """Held-out accuracy before RL (step 0) and after (the mean of the last three
  evaluations), greedy and, when logged, sampled; overall and by level."""
  rows = metrics_lib.read_metrics(str(workdir / "grpo"))
  evals = [r for r in rows if "eval/accuracy" in r]
  if not evals:
    raise RuntimeError(f"{workdir / 'grpo'}: no eval/accuracy rows in metrics.jsonl")
  before, last = evals[0], evals[-3:]
  mean = lambda key, rs: sum(r.get(key, 0.0) for r in rs) / len(rs)
  summary: dict[str, Any] = {"after_steps": [r["step"] for r in last], "metrics": {}}
  for prefix, label in METRICS:
    key = f"{prefix}accuracy"
    if key not in before:
      continue
    levels = sorted({k for r in evals for k in r if k.startswith(f"{prefix}accuracy_level_")},
                    key=lambda k: k.rsplit("_", 1)[-1].zfill(4))
    after = mean(key, last)
    summary["metrics"][label] = {
        "key": key, "before_rl": before[key], "after_rl": after, "gain": after - before[key],
        "stderr": before.get(f"{prefix}accuracy_stderr"),
        "by_level": {k.rsplit("_", 1)[-1]: {"before": before.get(k), "after": mean(k, last)}
                     for k in levels},
        "curve": [{"step": r["step"], "accuracy": r[key]} for r in evals if key in r]}
  return summary


def print_summary(summary: dict[str, Any], workdir: pathlib.Path, elapsed: float) -> None:
  n = len(summary["after_steps"])
  print(f"\nHeld-out accuracy (synthetic test items; after RL = mean of the last {n} "
        f"evaluations, steps {summary['after_steps']})")
  print(f"{'':<16}" + "".join(f"{label + ' before':>22}{'after':>8}" for label in summary["metrics"]))
  rows = [("all", {label: (m["before_rl"], m["after_rl"]) for label, m in summary["metrics"].items()})]
  levels = next(iter(summary["metrics"].values()))["by_level"]
  for level in levels:
    rows.append((f"  level {level}", {label: (m["by_level"][level]["before"], m["by_level"][level]["after"])
                                      for label, m in summary["metrics"].items() if level in m["by_level"]}))
  fmt = lambda v: "" if v is None else f"{v:.3f}"
  for name, values in rows:
    print(f"{name:<16}" + "".join(f"{fmt(values.get(label, (None, None))[0]):>22}"
                                   f"{fmt(values.get(label, (None, None))[1]):>8}"
                                   for label in summary["metrics"]))
  for label, m in summary["metrics"].items():
    print(f"gain, {label}: {m['gain']:+.3f} (one standard error of an evaluation "
          f"~{m['stderr'] or 0:.3f})")
  print(f"\nfinished in {elapsed / 60:.1f} min; outputs in {workdir}:")
  for name in ("summary.json", "curves.png", "curate/histogram.png", "grpo/metrics.jsonl",
               "grpo/checkpoints", "grpo/tensorboard"):
    print(f"  {workdir / name}")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  start = time.time()
  values = flags.FLAGS
  workdir = pathlib.Path(values.workdir)
  config = values.config
  print(f"[1/3] warm start ({config.sft.steps} supervised steps) -> {workdir / 'warm_start'}")
  run_warm_start(config, workdir, values.warm_start_tries, values.warm_start_margin)
  print(f"[2/3] difficulty curation ({values.curate_samples} samples x {values.curate_items} prompts)"
        f" -> {workdir / 'curate'}")
  curated = run_curation(config, workdir, values.curate_items, values.curate_samples)
  print(f"[3/3] GRPO ({config.total_steps} steps, {config.rl.estimator} + "
        f"{config.rl.difficulty_weighting} difficulty weighting) -> {workdir / 'grpo'}")
  train_lib.train(grpo_config(config, workdir, curated), str(workdir / "grpo"))
  rows = metrics_lib.read_metrics(str(workdir / "grpo"))
  plots.plot_curves(rows, ["eval/accuracy", "eval_sampled/accuracy", "accuracy", "reward_mean"],
                    str(workdir / "curves.png"), window=5,
                    labels={"eval/accuracy": "held-out greedy accuracy",
                            "eval_sampled/accuracy": "held-out sampled accuracy (T=1)",
                            "accuracy": "training accuracy (T=1)",
                            "reward_mean": "training reward"},
                    title="GRPO with difficulty-weighted advantages")
  summary = summarize(workdir)
  with open(workdir / "summary.json", "w") as f:
    json.dump(summary, f, indent=2)
  print_summary(summary, workdir, time.time() - start)


if __name__ == "__main__":
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  define_flags()
  app.run(main)
