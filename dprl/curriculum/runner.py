"""Chained training phases: each phase is a whole training config and starts from a base
checkpoint or the previous phase's final one.

    python -m dprl.curriculum --config configs/infi_mmr.py:tiny --workdir DIR \\
        [--config.phases.<name>.<key>=value ...]

Each phase trains in DIR/<phase>/ with `dprl.train.train`, so a rerun after a kill skips
finished phases (DIR/<phase>/DONE.json) and resumes the interrupted one from its last
checkpoint. After each phase the final model is evaluated on held-out items, with images
and as text only; the results go to DIR/summary.json and DIR/summary.png.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections

from dprl import train as train_lib

DONE_FILE = "DONE.json"


def phase_train_config(config: ml_collections.ConfigDict, name: str,
                       previous: str | None) -> ml_collections.ConfigDict:
  """The phase's training config with its starting checkpoint resolved."""
  phase = config.phases[name]
  start = phase.start_from
  if start == "base":
    init = config.base_checkpoint
  elif start == "previous":
    if previous is None:
      raise ValueError(f"config.phases.{name}.start_from = 'previous', but it is the first phase")
    init = previous
  else:  # an explicit checkpoint path
    init = start
  c = phase.train.copy_and_resolve_references()
  with c.unlocked():
    if init:
      c.model.init_checkpoint = init
  return c


def evaluate_phase(train_config: ml_collections.ConfigDict, checkpoint: str,
                   eval_config: ml_collections.ConfigDict) -> dict[str, float]:
  """Held-out greedy accuracy of the phase's final model, with images and text only."""
  from dprl.data.synthetic import generate_split  # pylint: disable=g-import-not-at-top
  from dprl.data.templates import TemplateConfig  # pylint: disable=g-import-not-at-top
  from dprl.evaluation.rollout import rollout_records  # pylint: disable=g-import-not-at-top
  from dprl.evaluation.metrics import summarize  # pylint: disable=g-import-not-at-top
  from dprl import eval as eval_lib  # pylint: disable=g-import-not-at-top
  data = train_config.data
  tokenizer = train_lib.load_tokenizer(train_config.tokenizer, os.path.dirname(checkpoint))
  view = ml_collections.ConfigDict({"checkpoint": checkpoint,
                                    "model": {"preset": train_config.model.preset, "seed": 0,
                                              "dtype": train_config.model.dtype}})
  model = eval_lib.load_model(view, tokenizer)
  tasks = [t.strip() for t in eval_config.tasks.split(",") if t.strip()]
  records = generate_split(tasks, "test", eval_config.num_items, data.seed,
                           image_size=data.image_size, language_prior_fraction=0.0)
  out = {}
  for key, names in (("with_images", eval_config.template), ("text_only", "text_only")):
    results = rollout_records(
        model, tokenizer, records, template=TemplateConfig(names=names, system_prompt=data.system_prompt),
        num_samples=1, temperature=0.0, max_new_tokens=train_config.sampling.max_new_tokens,
        batch_size=eval_config.batch_size, min_pixels=data.min_pixels, max_pixels=data.max_pixels,
        max_prompt_length=eval_config.max_prompt_length, progress=False)
    out[f"accuracy_{key}"] = float(summarize(results)["accuracy"])
  return out


def run_curriculum(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the phases in `config.phase_order`; returns (and writes) the summary."""
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  unknown = [n for n in config.phase_order if n not in config.phases]
  if unknown:
    raise ValueError(f"config.phase_order names {unknown}, not in config.phases "
                     f"({sorted(config.phases.keys())})")
  previous = None
  phases = []
  for name in config.phase_order:
    phase_dir = root / name
    done = phase_dir / DONE_FILE
    if done.exists():
      info = json.loads(done.read_text())
    else:
      train_config = phase_train_config(config, name, previous)
      result = train_lib.train(train_config, str(phase_dir))
      if result.preempted:
        raise SystemExit(f"phase {name!r} was preempted at step {result.step}; rerun to resume")
      checkpoint = str(phase_dir / "checkpoints")
      info = {"phase": name, "steps": result.step, "checkpoint": checkpoint,
              "started_from": train_config.model.init_checkpoint or "random init"}
      if config.eval.num_items:
        info["eval"] = evaluate_phase(train_config, checkpoint, config.eval)
      done.write_text(json.dumps(info, indent=2))
    previous = info["checkpoint"]
    phases.append(info)
  summary = {"phases": phases}
  (root / "summary.json").write_text(json.dumps(summary, indent=2))
  if config.eval.num_items:
    _plot(phases, str(root / "summary.png"))
  return summary


def _plot(phases: list[dict[str, Any]], path: str) -> None:
  from dprl.plots import plt  # pylint: disable=g-import-not-at-top  (Agg backend set there)
  names = [p["phase"] for p in phases]
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for offset, key in ((-0.2, "accuracy_with_images"), (0.2, "accuracy_text_only")):
    ax.bar([i + offset for i in range(len(names))], [p["eval"][key] for p in phases], width=0.4,
           label=key.replace("accuracy_", "").replace("_", " "))
  ax.set_xticks(range(len(names)), names)
  ax.set_ylabel("held-out greedy accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
