"""Phased curricula: chained configs, each phase starting from the previous one's checkpoint."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from dprl.curriculum.runner import phase_train_config, run_curriculum

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(variant="tiny"):
  spec = importlib.util.spec_from_file_location("infi_mmr", ROOT / "configs" / "infi_mmr.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_phases_chain_their_checkpoints():
  config = _config()
  assert list(config.phase_order) == ["text_only", "caption", "multimodal"]
  assert [config.phases[n].train.data.template for n in config.phase_order] == [
      "text_only", "caption", "plain"]
  first = phase_train_config(config, "text_only", None)
  assert first.model.init_checkpoint == ""  # base: the tiny preset's random init
  second = phase_train_config(config, "caption", "/runs/x/text_only/checkpoints")
  assert second.model.init_checkpoint == "/runs/x/text_only/checkpoints"
  with pytest.raises(ValueError, match="first phase"):
    phase_train_config(config, "caption", None)


def test_unknown_phase_name_is_named(tmp_path):
  config = _config()
  with config.unlocked():
    config.phase_order = ("text_only", "captions")
  with pytest.raises(ValueError, match=r"\['captions'\]"):
    run_curriculum(config, str(tmp_path))


@pytest.mark.slow
def test_three_phases_run_resume_and_summarize(tmp_path):
  summary = run_curriculum(_config(), str(tmp_path))
  phases = summary["phases"]
  assert [p["phase"] for p in phases] == ["text_only", "caption", "multimodal"]
  assert phases[0]["started_from"] == "random init"
  assert phases[1]["started_from"] == phases[0]["checkpoint"]
  assert phases[2]["started_from"] == phases[1]["checkpoint"]
  for p in phases:
    assert p["steps"] == 2
    assert 0.0 <= p["eval"]["accuracy_with_images"] <= 1.0
    assert 0.0 <= p["eval"]["accuracy_text_only"] <= 1.0
  assert (tmp_path / "summary.png").exists()
  rows_before = (tmp_path / "multimodal" / "metrics.jsonl").read_text()
  # A rerun finds every phase done and trains nothing.
  again = run_curriculum(_config(), str(tmp_path))
  assert again == json.loads((tmp_path / "summary.json").read_text())
  assert (tmp_path / "multimodal" / "metrics.jsonl").read_text() == rows_before


def test_difficulty_prior_recipe_reads_the_curated_stages_and_hints_stage2():
  spec = importlib.util.spec_from_file_location("dp", ROOT / "configs" / "difficulty_prior.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("cpu_demo")
  config.curated_dir = "/runs/curate"  # one override moves both stages
  stage1 = phase_train_config(config, "stage1", None)
  stage2 = phase_train_config(config, "stage2", "/runs/dp/stage1/checkpoints")
  assert stage1.data.path == "/runs/curate/stage1.jsonl"
  assert stage2.data.path == "/runs/curate/stage2.jsonl"
  assert "difficulty_hint" in stage2.data.template and "difficulty_hint" not in stage1.data.template
  assert stage2.model.init_checkpoint == "/runs/dp/stage1/checkpoints"
  assert stage1.rl.difficulty_weighting == stage2.rl.difficulty_weighting == "exp"
