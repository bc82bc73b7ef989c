"""Evaluate a checkpoint: K sampled responses per test item, scored; accuracy and pass@k.

    python -m dprl.eval --config configs/eval.py:tiny --workdir runs/eval
    python -m dprl.eval --config configs/eval.py:mathvista --checkpoint /ckpt \
        --config.data.path /data/mathvista/testmini.jsonl --workdir runs/mv \
        [--config.a.b=value ...]

The config is locked: an override of a key that does not exist is an error naming it.
Prints the metrics table and writes a JSON report (`config.output`, default
WORKDIR/eval.json) and the per-item responses (`config.results`, JSONL, written as they
arrive; with `config.resume=True` a rerun scores only the items not yet in it).

`evaluate(config, ...)` is the same as a function; training calls it with its live model.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from dprl import cli
from dprl.data import pipeline as pipeline_lib
from dprl.data import readers
from dprl.data import templates
from dprl.data import tokenizer as tokenizer_lib
from dprl.data.records import Record
from dprl.data.synthetic import generate_split
from dprl.evaluation import metrics as metrics_lib
from dprl.evaluation import rollout as rollout_lib
from dprl.models import config as model_config_lib
from dprl.models import qwen2_5_vl
from dprl.rl.registry import Registry

log = logging.getLogger(__name__)

SMALL_TOKENIZER_DIR = "tokenizers/small-v1"  # under dprl.data.tokenizer.default_cache_dir()

# ---------------------------------------------------------------------------------------
# Data: config.data.source -> records
# ---------------------------------------------------------------------------------------

DATA_SOURCES = Registry("evaluation data source")


@DATA_SOURCES.register("synthetic")
def synthetic_records(data: ml_collections.ConfigDict) -> list[Record]:
  tasks = [task.strip() for task in data.task.split("+")]
  return generate_split(tasks if len(tasks) > 1 else tasks[0], data.split, data.num_items,
                        seed=data.seed, image_size=data.image_size,
                        language_prior_fraction=data.language_prior_fraction)


@DATA_SOURCES.register("file")
def file_records(data: ml_collections.ConfigDict) -> list[Record]:
  if not data.path:
    raise ValueError("config.data.path is empty: set --config.data.path to the "
                     f"{data.layout} JSONL/JSON file (data.source='file')")
  if not os.path.isfile(data.path):
    raise FileNotFoundError(f"config.data.path: {data.path} is not a file")
  report = readers.ReadReport()
  records = readers.read_records(data.path, layout=data.layout,
                                 image_root=data.image_root or None, report=report)
  if not records:
    raise ValueError(f"config.data.path: {data.path} (layout {data.layout!r}) has no usable "
                     f"records: {report.summary()}")
  return records


def load_records(config: ml_collections.ConfigDict) -> list[Record]:
  """The test items `config.data` names, the first `data.max_items` if set."""
  records = DATA_SOURCES[config.data.source](config.data)
  if config.data.max_items > 0:
    records = records[:config.data.max_items]
  return records


# ---------------------------------------------------------------------------------------
# Prompt templates: config.template -> (TemplateConfig, records)
# ---------------------------------------------------------------------------------------


def _no_hint(records, template):
  return records, template


def _hint_hard(records, template):
  return records, template + ("difficulty_hint",)


def _hint_all(records, template):
  # The hint template keys on `pass_rate`; marking every item hardest hints them all.
  return [record.replace(pass_rate=0.0) for record in records], template + ("difficulty_hint",)


HINT_MODES: dict[str, Callable] = {"off": _no_hint, "hard": _hint_hard, "all": _hint_all}


def template_for(config: ml_collections.ConfigDict, records: Sequence[Record]
                 ) -> tuple[templates.TemplateConfig, list[Record]]:
  """The TemplateConfig `config.template` describes, and the records to render with it."""
  t = config.template
  names = templates.parse_template_names(t.names)
  if t.text_only and "text_only" not in names:
    names = ("text_only",) + names  # first: the later templates edit the text question
  if t.difficulty_hint not in HINT_MODES:
    raise ValueError(f"config.template.difficulty_hint is {t.difficulty_hint!r}; "
                     f"choose one of {sorted(HINT_MODES)}")
  records, names = HINT_MODES[t.difficulty_hint](list(records), names)
  template = templates.TemplateConfig(
      names=names, hint=t.hint, hint_below_pass_rate=t.hint_below_pass_rate,
      system_prompt=t.system_prompt or None)
  return template, records


# ---------------------------------------------------------------------------------------
# Model and tokenizer
# ---------------------------------------------------------------------------------------


def load_tokenizer(spec: str, checkpoint: str = ""):
  """config.tokenizer: "" (the checkpoint's, else Qwen2.5-VL's), "small", or a folder."""
  if spec in ("small", "small_words"):
    return tokenizer_lib.load_named(spec, tokenizer_lib.default_cache_dir() / f"{SMALL_TOKENIZER_DIR}-{spec}")
  if spec:
    return tokenizer_lib.load_tokenizer(spec)
  if checkpoint and os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
    return tokenizer_lib.load_tokenizer(checkpoint)
  return tokenizer_lib.load_tokenizer(None)


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
  sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  if sizes == (1, 1, 1):
    return None
  from dprl.parallel.mesh import make_mesh as make  # pylint: disable=g-import-not-at-top
  return make(*sizes)


def _is_hf_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def _load_hf(path: str, config, tokenizer, mesh):
  del tokenizer
  return qwen2_5_vl.from_pretrained(path, dtype=jnp.dtype(config.model.dtype), mesh=mesh)


def _load_orbax(path: str, config, tokenizer, mesh):
  """The `params` of the latest (or the named step's) Orbax checkpoint of a run."""
  del tokenizer
  from dprl.rl import checkpointing  # pylint: disable=g-import-not-at-top
  directory, step = checkpointing.find_checkpoint(path)
  meta = checkpointing.read_meta(directory, step)
  if "model_config" not in meta:
    raise ValueError(f"{directory}/{step}: checkpoint meta has no 'model_config' "
                     "(the config.json dict), so the model's shapes are unknown")
  model_config = model_config_lib.from_hf_dict(
      meta["model_config"], source=f"{directory}/{step}/meta").replace(
          dtype=jnp.dtype(config.model.dtype))
  abstract = qwen2_5_vl.abstract(model_config)
  graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
  if mesh is not None:
    from dprl.rl import train_state  # pylint: disable=g-import-not-at-top
    abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params,
        train_state.param_shardings(abstract_params, mesh))
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
  params = checkpointing.load_params(directory, step, abstract_params)
  log.info("restored step %d of %s", step, directory)
  return nnx.merge(graphdef, params, rest)


def _is_orbax(path: str) -> bool:
  try:
    from dprl.rl import checkpointing  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return checkpointing.find_checkpoint(path) is not None


# Checkpoint kinds, tried in order: (name, recognises(path), load(path, config, tokenizer, mesh)).
CHECKPOINT_KINDS: tuple[tuple[str, Callable[[str], bool], Callable], ...] = (
    ("huggingface", _is_hf_folder, _load_hf),
    ("orbax", _is_orbax, _load_orbax),
)


def load_model(config: ml_collections.ConfigDict, tokenizer, mesh=None):
  """The model `config.checkpoint` names, or a random `config.model.preset` without one."""
  path = config.checkpoint
  if not path:
    log.warning("no checkpoint: evaluating a randomly initialised %r model",
                config.model.preset)
    model_config = rollout_lib.model_config_for_tokenizer(
        model_config_lib.get_preset(config.model.preset,
                                    dtype=jnp.dtype(config.model.dtype)), tokenizer)
    return qwen2_5_vl.init(model_config, seed=config.model.seed)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
  for name, recognises, load in CHECKPOINT_KINDS:
    if recognises(path):
      log.info("loading %s checkpoint %s", name, path)
      return load(path, config, tokenizer, mesh)
  raise ValueError(f"--checkpoint {path}: neither a Hugging Face folder (no config.json) "
                   "nor an Orbax run, checkpoints or step folder")


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


def output_paths(config: ml_collections.ConfigDict, workdir: str | None
                 ) -> tuple[pathlib.Path, pathlib.Path]:
  """(JSON report, per-item JSONL) from config.output / config.results / workdir."""
  if config.output:
    output = pathlib.Path(config.output)
  elif workdir:
    output = pathlib.Path(workdir) / "eval.json"
  else:
    raise ValueError("nowhere to write the report: give --workdir or --config.output")
  results = (pathlib.Path(config.results) if config.results
             else output.with_name(output.stem + ".items.jsonl"))
  return output, results


def evaluate(config: ml_collections.ConfigDict, *, workdir: str | None = None,
             model=None, tokenizer=None, records: Sequence[Record] | None = None,
             mesh=None, print_table: bool = True) -> dict[str, Any]:
  """Runs the evaluation `config` describes; returns (and writes) the JSON report.

  Args:
    config: an eval config (configs/eval.py).
    workdir: where eval.json goes unless config.output says otherwise.
    model, tokenizer, records: use these instead of loading what the config names (a
      training loop passes its live model and tokenizer).
    mesh: the device mesh; default from config.mesh.
    print_table: print the metrics table to stdout.

  Returns:
    {"summary": metrics.summarize(...), "checkpoint", "num_records", "bad_records",
     "results_file", "seconds", "config"}.
  """
  start = time.time()
  output, results_path = output_paths(config, workdir)
  mesh = make_mesh(config) if mesh is None else mesh
  tokenizer = load_tokenizer(config.tokenizer, config.checkpoint) if tokenizer is None else tokenizer
  model = load_model(config, tokenizer, mesh) if model is None else model
  records = load_records(config) if records is None else list(records)
  template, records = template_for(config, records)
  bad_records = pipeline_lib.BadRecordReport()
  r = config.rollout
  results = rollout_lib.rollout_records(
      model, tokenizer, records, template=template, num_samples=r.num_samples,
      max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
      top_k=r.top_k, batch_size=r.batch_size, seed=r.seed, reward_fn=r.reward_fn,
      min_pixels=r.min_pixels, max_pixels=r.max_pixels,
      max_prompt_length=r.max_prompt_length, bad_records=bad_records,
      resume_from=results_path if config.resume else None,
      on_result=rollout_lib.ResultWriter(results_path, overwrite=not config.resume),
      progress=config.progress, mesh=mesh)
  summary = metrics_lib.summarize(results, ks=config.metrics.pass_at_k)
  report = {
      "summary": summary,
      "checkpoint": config.checkpoint or None,
      "num_records": len(records),
      "bad_records": {"counts": dict(bad_records.counts), "messages": bad_records.messages},
      "results_file": str(results_path),
      "seconds": time.time() - start,
      "config": config.to_dict(),
  }
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_name(output.name + ".tmp")
  tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  tmp.replace(output)
  if print_table:
    print(metrics_lib.format_table(summary))
    if bad_records.num_bad:
      print(bad_records.summary())
    print(f"wrote {output} and {results_path}")
  return report


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--config, --checkpoint, --workdir; defined on demand so importing `evaluate` from
  another entry point (which has its own --config) does not clash."""
  config_flags.DEFINE_config_file("config", None, "eval config file, e.g. "
                                  "configs/eval.py:tiny", flag_values=flag_values,
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "an HF checkpoint folder or an Orbax "
                      "run/checkpoints/step folder (overrides config.checkpoint)",
                      flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "folder for eval.json and eval.items.jsonl",
                      flag_values=flag_values)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/eval.py:tiny")
  if flags.FLAGS.checkpoint is not None:
    config.checkpoint = flags.FLAGS.checkpoint
  cli.setup_logging()
  evaluate(config, workdir=flags.FLAGS.workdir)


def run(argv: Sequence[str] | None = None) -> None:
  define_flags()
  app.run(main, argv=argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
