"""Offline difficulty curation (difficulty prior, arXiv 2505.13261): score, filter, split.

    python -m dprl.curate --config configs/curate.py:tiny --workdir runs/curate \
        [--config.init_checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct] [--config.a.b=value ...]

Samples K responses per prompt with the base model (`dprl.evaluation.rollout`, batched
across prompts), takes each prompt's pass rate as its difficulty, drops the prompts
outside the configured interval (always the never-right and always-right ones), splits
the rest into stage 1 (moderate) and stage 2 (moderate to hard) and flags the hard
stage-2 prompts for the difficulty hint; the logic is `dprl.curation.difficulty`.

Writes into WORKDIR:
  scoring_config.json  the settings the scores depend on; a rerun must match them
  scores.jsonl         one `ItemResult` a line (K responses, correct, rewards), appended
                       as prompts are scored: a killed run reruns and samples only the
                       prompts not in it, with the same results as an uninterrupted run
  histogram.json/.png  prompts per number of correct answers (the U shape)
  stage1.jsonl, stage2.jsonl (+ stage*_images/)
                       the curated sets in the `dprl` reader layout, `pass_rate` set,
                       `metadata["hint"]` and `metadata["curation"]` added
  tfds/dprl_records/<output.dataset_name>/1.0.0/
                       the same as array_record splits "stage1" and "stage2" (an empty
                       stage has no split): `tfds_builder.load_data_source(WORKDIR/tfds,
                       config=<dataset_name>)["stage1"]`
  templates.json       the TemplateConfig fields to train each stage with; stage 2's adds
                       the `difficulty_hint` template with the curated sentence/threshold
  report.json          the counts, also printed as a table; written last

The config is locked (a misspelt key is an error naming it). Filter, split, hint and
output settings may change between reruns: the stored scores are curated again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dprl import cli
from dprl import resumable
from dprl.resumable import drop_torn_tail
from dprl import eval as eval_lib
from dprl.curation import difficulty
from dprl.curation import report as report_lib
from dprl.data import pipeline as pipeline_lib
from dprl.data import readers
from dprl.data import templates
from dprl.data import tfds_builder
from dprl.data.records import Record
from dprl.evaluation import rollout as rollout_lib
from dprl.rl.registry import UnknownNameError

log = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
SCORING_CONFIG_FILE = "scoring_config.json"
# The config keys the scores depend on: a resumed run must not change them.
SCORING_KEYS = ("init_checkpoint", "tokenizer", "model", "data", "template", "sampling")
TFDS_DIR = "tfds"


# ---------------------------------------------------------------------------------------
# Config -> the pieces
# ---------------------------------------------------------------------------------------


def curation_config(config: ml_collections.ConfigDict) -> difficulty.CurationConfig:
  """config.filter / split / hint, checked against config.sampling.num_samples.

  Checked before anything is sampled, so a bad interval costs seconds, not a run.
  """
  f = config.filter
  result = difficulty.CurationConfig(
      low=f.low, high=f.high, min_correct=f.min_correct, max_correct=f.max_correct,
      split=difficulty.SplitConfig(**config.split.to_dict()),
      hint=difficulty.HintConfig(**config.hint.to_dict()))
  num_samples = config.sampling.num_samples
  try:
    difficulty.correct_bounds(num_samples, result.low, result.high, result.min_correct,
                              result.max_correct)
  except difficulty.CurationError as e:
    raise difficulty.CurationError(
        f"config.filter (with config.sampling.num_samples={num_samples}): {e}") from None
  try:
    rule = difficulty.SPLIT_RULES[result.split.rule]
  except UnknownNameError as e:
    raise difficulty.CurationError(f"config.split.rule: {e}") from None
  rule(np.zeros(0), result.split)  # checks the rule's own parameters
  return result


def check_output(config: ml_collections.ConfigDict) -> None:
  name = config.output.dataset_name
  # A TFDS config name is a folder name; a bad one would only fail after the sampling.
  if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
    raise difficulty.CurationError(
        f"config.output.dataset_name={name!r}: use letters, digits, '_', '-' and '.' "
        "(it names the folder tfds/dprl_records/<name>/)")


def base_template(config: ml_collections.ConfigDict) -> templates.TemplateConfig:
  return templates.TemplateConfig(names=config.template.names,
                                  system_prompt=config.template.system_prompt or None)


def load_model(config: ml_collections.ConfigDict, tokenizer, mesh=None):
  """The base model: `config.init_checkpoint` (HF or Orbax), or a random `model.preset`."""
  # dprl.eval.load_model reads `checkpoint` and `model`; curation names the former
  # `init_checkpoint`, as training does.
  view = ml_collections.ConfigDict({"checkpoint": config.init_checkpoint,
                                    "model": config.model.to_dict()})
  return eval_lib.load_model(view, tokenizer, mesh)


def load_tokenizer(config: ml_collections.ConfigDict):
  return eval_lib.load_tokenizer(config.tokenizer, config.init_checkpoint)


def check_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  if mesh is not None and config.sampling.batch_size % mesh.shape["data"]:
    raise ValueError(f"config.sampling.batch_size={config.sampling.batch_size} must be a "
                     f"multiple of the mesh's data axis ({mesh.shape['data']} devices)")


# ---------------------------------------------------------------------------------------
# Resumable scoring
# ---------------------------------------------------------------------------------------


def scoring_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {key: config[key].to_dict() if isinstance(config[key], ml_collections.ConfigDict)
          else config[key] for key in SCORING_KEYS}


def check_scoring_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Records the scoring settings, or checks them against those of the stored scores."""
  path = workdir / SCORING_CONFIG_FILE
  settings = json.loads(json.dumps(scoring_settings(config)))  # tuples -> lists
  if path.exists():
    stored = json.loads(path.read_text(encoding="utf-8"))
    changed = resumable.changed_settings(stored, settings)
    if changed:
      raise difficulty.CurationError(
          f"{path}: the scores in {workdir / SCORES_FILE} were sampled with other settings "
          f"than this run's: config.{', config.'.join(changed)} differ. Resume with the "
          "same settings, or use a fresh --workdir")
    return
  if (workdir / SCORES_FILE).exists() and (workdir / SCORES_FILE).stat().st_size:
    raise difficulty.CurationError(
        f"{workdir / SCORES_FILE} exists but {path} does not, so the settings its scores "
        "were sampled with are unknown; delete it or use a fresh --workdir")
  report_lib.write_json(settings, path)



def score_records(config: ml_collections.ConfigDict, workdir: pathlib.Path, model, tokenizer,
                  records: Sequence[Record], mesh=None,
                  bad_records: pipeline_lib.BadRecordReport | None = None
                  ) -> list[rollout_lib.ItemResult]:
  """K scored responses per record, resumed from and appended to WORKDIR/scores.jsonl."""
  check_scoring_config(workdir, config)
  scores_path = workdir / SCORES_FILE
  drop_torn_tail(scores_path)
  s = config.sampling
  reward_params = {"answer_pattern": s.answer_pattern} if s.answer_pattern else {}
  return rollout_lib.rollout_records(
      model, tokenizer, records, template=base_template(config), num_samples=s.num_samples,
      max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
      top_k=s.top_k, batch_size=s.batch_size, seed=s.seed, reward_fn=s.reward_fn,
      reward_params=reward_params, min_pixels=s.min_pixels, max_pixels=s.max_pixels,
      max_prompt_length=s.max_prompt_length, bad_records=bad_records,
      resume_from=scores_path, on_result=rollout_lib.ResultWriter(scores_path),
      progress=config.progress, mesh=mesh)


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def write_tfds(stages: dict[str, list[Record]], data_dir: pathlib.Path,
               name: str) -> list[str]:
  """Builds the non-empty stages as splits of dprl_records/<name>; returns their names."""
  version_dir = (data_dir / tfds_builder.RecordsBuilder.name / name /
                 str(tfds_builder.RecordsBuilder.VERSION))
  if version_dir.exists():  # TFDS would reuse it; a rerun may have curated differently
    shutil.rmtree(version_dir)
  splits = {stage: records for stage, records in stages.items() if records}
  for stage in stages:
    if stage not in splits:  # TFDS cannot write a split without examples
      log.warning("%s is empty: no TFDS split %r", stage, stage)
  if splits:
    tfds_builder.RecordsBuilder(splits=splits, config=name,
                                data_dir=os.fspath(data_dir)).download_and_prepare()
  return list(splits)


def write_outputs(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                  curation: difficulty.Curation,
                  template: templates.TemplateConfig) -> dict[str, Any]:
  """The stage datasets, histogram and templates; returns the report's "outputs"."""
  stages = {"stage1": curation.stage1, "stage2": curation.stage2}
  outputs: dict[str, Any] = {}
  for stage, records in stages.items():
    images = workdir / f"{stage}_images"
    if images.exists():  # images of an earlier curation's records would linger
      shutil.rmtree(images)
    readers.write_jsonl(records, workdir / f"{stage}.jsonl", image_dir=images)
    outputs[f"{stage}_jsonl"] = f"{stage}.jsonl"
  if config.output.tfds:
    splits = write_tfds(stages, workdir / TFDS_DIR, config.output.dataset_name)
    outputs["tfds"] = {"data_dir": TFDS_DIR, "builder": tfds_builder.RecordsBuilder.name,
                       "config": config.output.dataset_name, "splits": splits}
  hist = report_lib.histogram_json(curation)
  report_lib.write_json(hist, workdir / "histogram.json")
  report_lib.plot_histogram(hist, workdir / "histogram.png")
  outputs["histogram"] = ["histogram.json", "histogram.png"]
  stage_templates = {
      "stage1": template,
      "stage2": difficulty.hint_template_config(template, curation_config(config).hint)}
  report_lib.write_json({stage: dataclasses.asdict(t) for stage, t in stage_templates.items()},
                        workdir / "templates.json")
  outputs["templates"] = "templates.json"
  return outputs


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def curate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, model=None,
           tokenizer=None, records: Sequence[Record] | None = None, mesh=None,
           print_table: bool = True) -> dict[str, Any]:
  """Runs the curation `config` describes into `workdir`; returns the report it writes.

  Args:
    config: a curation config (configs/curate.py).
    workdir: the output folder; its scores.jsonl, if any, is resumed.
    model, tokenizer, records: use these instead of loading what the config names.
    mesh: the device mesh; default from config.mesh.
    print_table: print the counts table to stdout.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  curation_settings = curation_config(config)
  check_output(config)
  template = base_template(config)
  mesh = eval_lib.make_mesh(config) if mesh is None else mesh
  check_mesh(config, mesh)
  records = eval_lib.load_records(config) if records is None else list(records)
  if not records:
    raise difficulty.CurationError("config.data: no records to curate")
  tokenizer = load_tokenizer(config) if tokenizer is None else tokenizer
  model = load_model(config, tokenizer, mesh) if model is None else model

  bad_records = pipeline_lib.BadRecordReport()
  results = score_records(config, workdir, model, tokenizer, records, mesh, bad_records)
  scores = {r.id: difficulty.Score(r.id, r.num_correct, r.num_samples) for r in results}
  scored = [record for record in records if record.id in scores]
  curation = difficulty.curate(scored, scores, curation_settings)

  outputs = write_outputs(config, workdir, curation, template)
  counts = report_lib.counts_report(curation)
  report = {
      "counts": counts,
      "num_records": len(records),
      # Records the pipeline could not turn into prompts (bad image, too long, ...).
      "unscored": {"count": len(records) - len(scored),
                   "reasons": dict(sorted(bad_records.counts.items()))},
      "outputs": outputs,
      "config": config.to_dict(),
  }
  report_lib.write_json(report, workdir / "report.json")
  if print_table:
    print(report_lib.format_counts(counts))
    if report["unscored"]["count"]:
      print(f"unscored (bad records): {report['unscored']['count']} "
            f"{report['unscored']['reasons']}")
    print(f"wrote {workdir}: stage1.jsonl, stage2.jsonl, {TFDS_DIR}/, histogram.png, "
          "report.json")
  return report


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Sequence[str] | None = None) -> None:
  """--config and --workdir; defined by `run`, not on import, so that importing this
  module from another entry point (with its own --config) does not clash.

  `argv`: where config_flags looks for the --config.a.b overrides (None: sys.argv).
  """
  config_flags.DEFINE_config_file(
      "config", None, "curation config file, e.g. configs/curate.py:tiny",
      flag_values=flag_values, lock_config=True,
      sys_argv=None if argv is None else list(argv))
  flags.DEFINE_string("workdir", None, "output folder (resumed if it has scores)",
                      flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flag_values.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/curate.py:tiny")
  if not flag_values.workdir:
    raise app.UsageError("--workdir is required")
  cli.setup_logging()
  curate(flag_values.config, flag_values.workdir)


parse_flags = cli.parse_flags  # the entry point's parser (tests call it)


def run(argv: Sequence[str] | None = None) -> None:
  define_flags(argv=argv)
  app.run(main, argv=argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
