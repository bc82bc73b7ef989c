"""RAP data selection (arXiv 2506.04755): score every sample with the base model, keep the
ones with reasoning activation potential.

    python -m dprl.select --config configs/rap.py:tiny --workdir runs/rap \
        [--config.init_checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct] [--config.a.b=value ...]

For each record: M rollouts with image + question and M with the question alone
(`dprl.evaluation.rollout`), giving CDE's `D = acc_mm - acc_text`; then one image-prompt
response is teacher-forced, as the token ids that were sampled, and ACE's largest
attention confidence over uninformative tokens is read
(`dprl.curation.attention_confidence`). `dprl.curation.rap.select` then
applies CDE, ACE and DRM to the scores.

Writes into WORKDIR:
  scoring_config.json  the settings the scores depend on; a rerun must match them
  rollouts_mm.jsonl, rollouts_text.jsonl
                       one `ItemResult` a line (M responses and their sampled token
                       ids, correct, rewards), appended as prompts are sampled, resumed
                       chunk by chunk
  scores.jsonl         one `rap.SampleScore` a line (id, acc_mm, acc_text, D, max_psi,
                       ...), appended as samples are scored; a rerun skips scored ids
  decisions.jsonl      every scored sample with its tests and final reason (kept or why
                       removed: cde, ace, drm_trivial; kept as selected, drm_replacement,
                       drm_refill)
  selected.jsonl (+ selected_images/)
                       the subset in the `dprl` reader layout, in selection order, with
                       `pass_rate` = acc_mm and `metadata["rap"]` = its scores
  tfds/dprl_records/<output.dataset_name>/1.0.0/
                       the same as the array_record split "train" (none when empty)
  plots/discrepancy.png, plots/max_psi.png
                       the distributions of D and of log10 max psi with the thresholds
  report.json          how many each estimator removed (also printed); written last

Select and output settings may change between reruns: the stored scores are selected
again, nothing is sampled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tqdm
from absl import app, flags
from ml_collections import config_flags

from dprl import cli
from dprl import resumable
from dprl.resumable import drop_torn_tail
from dprl import eval as eval_lib
from dprl.curation import attention_confidence as ace_lib
from dprl.curation import rap
from dprl.data import pipeline as pipeline_lib
from dprl.data import readers
from dprl.data import templates
from dprl.data import tfds_builder
from dprl.data import tokenizer as tokenizer_lib
from dprl.data.records import Record
from dprl.evaluation import rollout as rollout_lib

log = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
DECISIONS_FILE = "decisions.jsonl"
SCORING_CONFIG_FILE = "scoring_config.json"
ROLLOUT_FILES = {"mm": "rollouts_mm.jsonl", "text": "rollouts_text.jsonl"}
# The config keys the scores depend on: a resumed run must not change them.
SCORING_KEYS = ("init_checkpoint", "tokenizer", "model", "data", "template", "rollout", "ace")
TFDS_DIR = "tfds"
PLOTS_DIR = "plots"


class SelectionError(ValueError):
  """A setting or stored file that cannot work; the message names the key or file."""


# ---------------------------------------------------------------------------------------
# Config -> the pieces
# ---------------------------------------------------------------------------------------


def selection_config(config: ml_collections.ConfigDict) -> rap.SelectionConfig:
  try:
    return rap.SelectionConfig(**config.select.to_dict())
  except ValueError as e:
    raise SelectionError(f"config.select: {e}") from None


def ace_config(config: ml_collections.ConfigDict) -> ace_lib.AceConfig:
  fields = {k: v for k, v in config.ace.to_dict().items() if k != "score_every"}
  try:
    return ace_lib.AceConfig(**fields)
  except ValueError as e:
    raise SelectionError(f"config.ace: {e}") from None


def template_config(config: ml_collections.ConfigDict) -> templates.TemplateConfig:
  return templates.TemplateConfig(names=config.template.names,
                                  system_prompt=config.template.system_prompt or None)


def pipeline_config(config: ml_collections.ConfigDict, model_config) -> pipeline_lib.PipelineConfig:
  """The prompt settings `rollout_records` uses, for ACE's teacher forcing."""
  r = config.rollout
  return pipeline_lib.PipelineConfig(
      batch_size=1, shuffle=False, num_epochs=1, template=template_config(config),
      min_pixels=r.min_pixels, max_pixels=r.max_pixels,
      patch_size=model_config.vision.patch_size,
      temporal_patch_size=model_config.vision.temporal_patch_size,
      merge_size=model_config.vision.spatial_merge_size, max_prompt_length=r.max_prompt_length)


def question_only(record: Record) -> Record:
  """The record without its images: the same prompt, question alone (CDE's text arm)."""
  return record.replace(images=())


def _model_view(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  # dprl.eval.load_model reads `checkpoint`; selection names it `init_checkpoint`.
  return ml_collections.ConfigDict({"checkpoint": config.init_checkpoint,
                                    "model": config.model.to_dict()})


def check_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  if mesh is not None and config.rollout.batch_size % mesh.shape["data"]:
    raise SelectionError(f"config.rollout.batch_size={config.rollout.batch_size} must be a "
                         f"multiple of the mesh's data axis ({mesh.shape['data']} devices)")


# ---------------------------------------------------------------------------------------
# Resumable scoring
# ---------------------------------------------------------------------------------------


def write_json(payload: Any, path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  tmp.replace(path)  # never half-written


def scoring_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  settings = {key: config[key].to_dict() if isinstance(config[key], ml_collections.ConfigDict)
              else config[key] for key in SCORING_KEYS}
  # How often scores are flushed and how many queries are attended at a time, not what
  # the scores are (a workdir scored before query_chunk existed resumes too).
  for key in ("score_every", "query_chunk"):
    settings["ace"].pop(key)
  return json.loads(json.dumps(settings))  # tuples -> lists, as stored


def check_scoring_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Records the scoring settings, or checks them against those of the stored scores."""
  path = workdir / SCORING_CONFIG_FILE
  settings = scoring_settings(config)
  if path.exists():
    stored = json.loads(path.read_text(encoding="utf-8"))
    changed = resumable.changed_settings(stored, settings)
    if changed:
      raise SelectionError(
          f"{path}: the scores in {workdir} were computed with other settings than this "
          f"run's: config.{', config.'.join(changed)} differ. Resume with the same "
          "settings, or use a fresh --workdir")
    return
  stored_files = [workdir / name for name in (SCORES_FILE, *ROLLOUT_FILES.values())]
  if any(p.exists() and p.stat().st_size for p in stored_files):
    raise SelectionError(f"{workdir} has scores or rollouts but no {SCORING_CONFIG_FILE}, so "
                         "the settings they were computed with are unknown; delete them or "
                         "use a fresh --workdir")
  write_json(settings, path)



def rollouts(config: ml_collections.ConfigDict, workdir: pathlib.Path, arm: str, model,
             tokenizer, records: Sequence[Record], mesh, bad_records
             ) -> dict[str, rollout_lib.ItemResult]:
  """M scored responses per record for one CDE arm ("mm" or "text"), resumed."""
  path = workdir / ROLLOUT_FILES[arm]
  drop_torn_tail(path)
  r = config.rollout
  reward_params = {"answer_pattern": r.answer_pattern} if r.answer_pattern else {}
  shown = records if arm == "mm" else [question_only(record) for record in records]
  results = rollout_lib.rollout_records(
      model, tokenizer, shown, template=template_config(config), num_samples=r.num_samples,
      max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
      top_k=r.top_k, batch_size=r.batch_size, seed=r.seed if arm == "mm" else r.seed + 1,
      reward_fn=r.reward_fn, reward_params=reward_params, min_pixels=r.min_pixels,
      max_pixels=r.max_pixels, max_prompt_length=r.max_prompt_length,
      bad_records=bad_records, resume_from=path, on_result=rollout_lib.ResultWriter(path),
      progress=config.progress, mesh=mesh)
  return {result.id: result for result in results}


def score_records(config: ml_collections.ConfigDict, workdir: pathlib.Path, model, tokenizer,
                  records: Sequence[Record], mesh=None,
                  bad_records: pipeline_lib.BadRecordReport | None = None
                  ) -> list[rap.SampleScore]:
  """One `SampleScore` per good record, resumed from and appended to scores.jsonl."""
  check_scoring_config(workdir, config)
  scores_path = workdir / SCORES_FILE
  drop_torn_tail(scores_path)
  done = {s.id: s for s in rap.read_scores(scores_path)} if scores_path.exists() else {}
  for score in done.values():
    if score.num_mm != config.rollout.num_samples:
      raise SelectionError(f"{scores_path}: sample {score.id!r} has {score.num_mm} rollouts, "
                           f"config.rollout.num_samples is {config.rollout.num_samples}")
  todo = [record for record in records if record.id not in done]
  if todo:
    # All records, not just `todo`: the rollouts' chunking (and so their samples) then
    # does not depend on where an earlier run stopped; done chunks are not resampled.
    mm = rollouts(config, workdir, "mm", model, tokenizer, records, mesh, bad_records)
    text = rollouts(config, workdir, "text", model, tokenizer, records, mesh, None)
    todo = [record for record in todo if record.id in mm and record.id in text]
    ace_settings = ace_config(config)
    matcher = ace_lib.TokenMatcher(tokenizer, ace_settings.uninformative)
    prompts = pipeline_config(config, model.config)
    pick = ace_lib.RESPONSE_PICKERS[ace_settings.response]
    eos_id = tokenizer_lib.SpecialTokenIds.from_tokenizer(tokenizer).eos
    without_ids = sum(mm[r.id].response_token_ids is None for r in todo)
    if without_ids:
      log.warning(
          "%s: %d of %d records' rollouts were stored without their sampled token ids "
          "(written by an older dprl); ACE re-encodes their text instead, which may "
          "segment it otherwise than the sampler did. Delete %s and %s to resample them",
          workdir / ROLLOUT_FILES["mm"], without_ids, len(todo), ROLLOUT_FILES["mm"],
          SCORES_FILE)
    step = max(1, config.ace.score_every)
    with tqdm.tqdm(total=len(todo), unit="item", desc="ace", disable=not config.progress,
                   dynamic_ncols=True) as bar:
      for start in range(0, len(todo), step):
        block = todo[start:start + step]
        picked = [pick(mm[r.id].correct, mm[r.id].response_lengths) for r in block]
        ace_scores = ace_lib.score_responses(
            model, tokenizer, block,
            [teacher_forced_ids(mm[r.id], k, tokenizer, eos_id, config.rollout.max_new_tokens)
             for r, k in zip(block, picked)],
            pipeline_config=prompts, config=ace_settings, matcher=matcher)
        new = [sample_score(record, mm[record.id], text[record.id], a)
               for record, a in zip(block, ace_scores)]
        rap.append_scores(scores_path, new)
        done.update((s.id, s) for s in new)
        bar.update(len(block))
  return [done[record.id] for record in records if record.id in done]


def teacher_forced_ids(result: rollout_lib.ItemResult, k: int, tokenizer, eos_id: int,
                       max_new_tokens: int) -> list[int]:
  """Response k's ids for ACE: the sampled ones, else (an older rollouts file) its text
  encoded again, with the end token put back if it stopped before `max_new_tokens` (only
  an end token stops generation earlier)."""
  if result.response_token_ids is not None:
    return list(result.response_token_ids[k])
  return ace_lib.response_token_ids(tokenizer, result.responses[k],
                                    result.response_lengths[k] < max_new_tokens, eos_id)


def sample_score(record: Record, mm: rollout_lib.ItemResult, text: rollout_lib.ItemResult,
                 ace_score: ace_lib.AceScore) -> rap.SampleScore:
  prior = record.metadata.get("language_prior")
  return rap.SampleScore(
      id=record.id, num_mm=mm.num_samples, mm_correct=mm.num_correct,
      num_text=text.num_samples, text_correct=text.num_correct,
      log_max_psi=ace_score.log_max_psi, max_psi_token=ace_score.token,
      source=record.source, level=record.level,
      language_prior=None if prior is None else bool(prior))


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def selected_records(records: Sequence[Record], selection: rap.Selection) -> list[Record]:
  """The subset in selection order, with pass_rate = acc_mm and metadata["rap"]."""
  by_id = {record.id: record for record in records}
  decisions = {d.score.id: d for d in selection.decisions}
  subset = []
  for rid in selection.selected:
    d = decisions[rid]
    s = d.score
    scores = {"acc_mm": s.acc_mm, "acc_text": s.acc_text, "D": s.discrepancy,
              "max_psi": s.max_psi, "reason": d.reason}
    subset.append(by_id[rid].replace(pass_rate=s.acc_mm,
                                     metadata={**by_id[rid].metadata, "rap": scores}))
  return subset


def write_tfds(records: list[Record], data_dir: pathlib.Path, name: str) -> list[str]:
  """Builds split "train" of dprl_records/<name> (none when empty); returns the splits."""
  version_dir = (data_dir / tfds_builder.RecordsBuilder.name / name /
                 str(tfds_builder.RecordsBuilder.VERSION))
  if version_dir.exists():  # TFDS would reuse it; a rerun may have selected differently
    shutil.rmtree(version_dir)
  if not records:  # TFDS cannot write a split without examples
    log.warning("the selection is empty: no TFDS split written")
    return []
  tfds_builder.RecordsBuilder(splits={"train": records}, config=name,
                              data_dir=os.fspath(data_dir)).download_and_prepare()
  return ["train"]


def plot_scores(scores: Sequence[rap.SampleScore], settings: rap.SelectionConfig,
                out_dir: pathlib.Path) -> list[str]:
  """Histograms of D (split by the language-prior flag where known) and log10 max psi."""
  import matplotlib  # pylint: disable=g-import-not-at-top  # only when plotting
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  out_dir.mkdir(parents=True, exist_ok=True)
  m = max((s.num_mm for s in scores), default=1)
  # D takes values k / M: one bin per value.
  edges = (np.arange(-m, m + 2) - 0.5) / m
  groups = {"all": [s.discrepancy for s in scores]}
  if any(s.language_prior is not None for s in scores):
    groups = {"language prior": [s.discrepancy for s in scores if s.language_prior],
              "other": [s.discrepancy for s in scores if not s.language_prior]}
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(list(groups.values()), bins=edges, stacked=True, label=list(groups))
  ax.axvline(settings.cde_threshold, color="k", linestyle="--",
             label=f"keep D > {settings.cde_threshold:g}")
  ax.set(xlabel="D = acc_mm - acc_text", ylabel="samples",
         title=f"Causal discrepancy ({len(scores)} samples, M = {m})")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_dir / "discrepancy.png", dpi=120)
  plt.close(fig)

  log10 = np.array([s.log_max_psi / math.log(10) for s in scores])
  finite = log10[np.isfinite(log10)]
  fig, ax = plt.subplots(figsize=(6, 4))
  if finite.size:
    ax.hist(finite, bins=min(50, max(5, finite.size // 2)))
  ax.axvline(math.log10(settings.ace_lambda), color="k", linestyle="--",
             label=f"drop max psi > {settings.ace_lambda:g}")
  ax.set(xlabel="log10 max psi over uninformative tokens", ylabel="samples",
         title=f"Attention confidence ({log10.size - finite.size} with psi = 0 or no "
               "uninformative token not shown)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_dir / "max_psi.png", dpi=120)
  plt.close(fig)
  return [f"{PLOTS_DIR}/discrepancy.png", f"{PLOTS_DIR}/max_psi.png"]


def write_outputs(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                  records: Sequence[Record], scores: Sequence[rap.SampleScore],
                  selection: rap.Selection, settings: rap.SelectionConfig) -> dict[str, Any]:
  tmp = workdir / (DECISIONS_FILE + ".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for decision in selection.decisions:
      f.write(json.dumps(decision.to_json(), ensure_ascii=False) + "\n")
  tmp.replace(workdir / DECISIONS_FILE)
  outputs: dict[str, Any] = {"decisions": DECISIONS_FILE, "scores": SCORES_FILE}
  subset = selected_records(records, selection)
  images = workdir / "selected_images"
  if images.exists():  # images of an earlier selection's records would linger
    shutil.rmtree(images)
  readers.write_jsonl(subset, workdir / "selected.jsonl", image_dir=images)
  outputs["selected_jsonl"] = "selected.jsonl"
  if config.output.tfds:
    splits = write_tfds(subset, workdir / TFDS_DIR, config.output.dataset_name)
    outputs["tfds"] = {"data_dir": TFDS_DIR, "builder": tfds_builder.RecordsBuilder.name,
                       "config": config.output.dataset_name, "splits": splits}
  if config.output.plots:
    outputs["plots"] = plot_scores(scores, settings, workdir / PLOTS_DIR)
  return outputs


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def run_selection(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                  model=None, tokenizer=None, records: Sequence[Record] | None = None,
                  mesh=None, print_table: bool = True) -> dict[str, Any]:
  """Runs the selection `config` describes into `workdir`; returns the report it writes.

  Args:
    config: a RAP config (configs/rap.py).
    workdir: the output folder; its rollouts and scores, if any, are resumed.
    model, tokenizer, records: use these instead of loading what the config names.
    mesh: the device mesh; default from config.mesh.
    print_table: print the counts table to stdout.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  settings = selection_config(config)  # checked before anything is sampled
  ace_config(config)
  mesh = eval_lib.make_mesh(config) if mesh is None else mesh
  check_mesh(config, mesh)
  records = eval_lib.load_records(config) if records is None else list(records)
  if not records:
    raise SelectionError("config.data: no records to select from")
  tokenizer = (eval_lib.load_tokenizer(config.tokenizer, config.init_checkpoint)
               if tokenizer is None else tokenizer)
  model = eval_lib.load_model(_model_view(config), tokenizer, mesh) if model is None else model
  ace_lib.resolve_layer(config.ace.layer, model.config.text.num_hidden_layers)

  bad_records = pipeline_lib.BadRecordReport()
  scores = score_records(config, workdir, model, tokenizer, records, mesh, bad_records)
  selection = rap.select(scores, settings)
  outputs = write_outputs(config, workdir, records, scores, selection, settings)
  report = {
      "counts": selection.report,
      "num_records": len(records),
      # Records the pipeline could not turn into prompts (bad image, too long, ...).
      "unscored": {"count": len(records) - len(scores),
                   "reasons": dict(sorted(bad_records.counts.items()))},
      "select": dataclasses.asdict(settings),
      "outputs": outputs,
      "config": json.loads(json.dumps(config.to_dict())),
  }
  write_json(report, workdir / "report.json")
  if print_table:
    print(rap.report_table(selection.report))
    if report["unscored"]["count"]:
      print(f"unscored (bad records): {report['unscored']['count']} "
            f"{report['unscored']['reasons']}")
    print(f"wrote {workdir}: selected.jsonl, {DECISIONS_FILE}, {TFDS_DIR}/, {PLOTS_DIR}/, "
          "report.json")
  return report


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--config and --workdir; defined by `run`, not on import, so that importing this
  module beside another entry point's --config (dprl.demo, dprl.sweep, tests) works."""
  config_flags.DEFINE_config_file("config", None, "RAP config file, e.g. configs/rap.py:tiny",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "output folder (resumed if it has scores)",
                      flag_values=flag_values)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  if values.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/rap.py:tiny")
  if not values.workdir:
    raise app.UsageError("--workdir is required")
  cli.setup_logging()
  run_selection(values.config, values.workdir)


def run() -> None:
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
