"""Experiment sweeps: arms x seeds from one base, resumable, aggregated (dprl.sweep)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from dprl import sweep
from dprl.cli import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ("difficulty_prior", "rap", "infi_mmr")


def _tiny_train(steps: int) -> ml_collections.ConfigDict:
  train = load_config(f"{ROOT}/configs/grpo.py:tiny")
  sweep.tiny_sizes(train)
  train.total_steps = steps
  train.sft.steps = 0
  return train


def _tiny_sweep() -> ml_collections.ConfigDict:
  """2 arms x 2 seeds x 2 steps: one phase of 2 steps; two phases of 1 step each."""
  warm = _tiny_train(0)
  warm.sft.steps = 2
  c = sweep.base_config(warm)
  c.base.warm_start_margin = -1.0  # 2 steps of the tiny preset: any warm start will do
  c.title = "tiny sweep"
  c.seeds = "0,1"
  c.arms.one_phase = sweep.one_phase_arm(_tiny_train(2), eval_items=8)
  two = sweep.one_phase_arm(_tiny_train(1), eval_items=8, phase="a")
  two.phase_order = ("a", "b")
  two.phases.b = ml_collections.ConfigDict({"start_from": "previous", "train": _tiny_train(1)})
  c.arms.two_phase = two
  c.arm_order = "one_phase,two_phase"
  c.lock()
  return c


# ---------------------------------------------------------------------------------------
# Aggregation maths on fabricated metrics rows
# ---------------------------------------------------------------------------------------


def _rows(evals: dict[int, float], levels: dict[int, dict[str, float]] | None = None):
  """metrics.jsonl rows: a training row every step, eval keys on some."""
  rows = []
  for step in range(max(evals) + 1):
    row = {"step": step, "loss": 0.1}
    if step in evals:
      row["eval/accuracy"] = evals[step]
      for level, value in (levels or {}).get(step, {}).items():
        row[f"eval/accuracy_level_{level}"] = value
    rows.append(row)
  return rows


def test_eval_curve_offsets_later_phases_by_the_earlier_ones_steps_and_rollouts():
  phases = [
      {"name": "a", "rows": _rows({0: 0.5, 2: 0.6, 4: 0.7}), "steps": 4, "rollouts_per_step": 32},
      {"name": "b", "rows": _rows({0: 0.65, 2: 0.8, 3: 0.9}), "steps": 3, "rollouts_per_step": 8},
  ]
  curve = sweep.eval_curve(phases)
  # b's step 0 (a's final model, measured by b) replaces a's last point at step 4.
  assert [p["step"] for p in curve] == [0, 2, 4, 6, 7]
  assert [p["rollouts"] for p in curve] == [0, 64, 128, 128 + 16, 128 + 24]
  assert [p["accuracy"] for p in curve] == [0.5, 0.6, 0.65, 0.8, 0.9]
  assert [p["phase"] for p in curve] == ["a", "a", "b", "b", "b"]


def test_each_metric_family_has_its_own_curve():
  rows = _rows({0: 0.5, 2: 0.6})
  rows[0].update({"eval_sampled/accuracy": 0.3, "eval_sampled/accuracy_level_1": 0.9})
  rows[2]["eval_sampled/accuracy"] = 0.45
  phases = [{"name": "a", "rows": rows, "steps": 2, "rollouts_per_step": 4}]
  assert [p["accuracy"] for p in sweep.eval_curve(phases)] == [0.5, 0.6]
  sampled = sweep.eval_curve(phases, "eval_sampled")
  assert [p["accuracy"] for p in sampled] == [0.3, 0.45]
  assert sampled[0]["by_level"] == {"1": 0.9} and sampled[1]["by_level"] == {}
  assert sweep.eval_curve(phases, "eval_other") == []
  run = {"phases": [{**phases[0], "end_eval": {}}], "wall_s": 1.0}
  assert sweep.summarize_run(run, 1, metric="eval_sampled")["gain"] == pytest.approx(0.15)


def test_a_key_added_since_a_run_was_made_is_not_a_change_but_a_removed_one_is():
  stored = {"a": 1, "b": {"c": "x"}, "logging": {"progress": True}}
  assert sweep.changed_keys(stored, {**stored, "new": 5}) == []
  assert sweep.changed_keys(stored, {**stored, "logging": {"progress": False}}) == []
  assert sweep.changed_keys(stored, {"a": 2, "b": {}}) == ["a: 1 -> 2", "b.c: 'x' -> None"]


def test_final_accuracy_is_the_mean_of_the_last_three_evaluations_overall_and_by_level():
  levels = {0: {"1": 0.9, "2": 0.1}, 2: {"1": 1.0, "2": 0.2}, 4: {"1": 0.8, "2": 0.3},
            6: {"1": 0.6, "2": 0.4}}
  run = {"phases": [{"name": "grpo", "rows": _rows({0: 0.4, 2: 0.5, 4: 0.7, 6: 0.6}, levels),
                     "steps": 6, "rollouts_per_step": 10,
                     "end_eval": {"accuracy_with_images": 0.61, "accuracy_text_only": 0.3}}],
         "wall_s": 12.0}
  summary = sweep.summarize_run(run, last=3)
  assert summary["final_accuracy"] == pytest.approx((0.5 + 0.7 + 0.6) / 3)
  assert summary["final_steps"] == [2, 4, 6]
  assert summary["final_by_level"] == pytest.approx({"1": (1.0 + 0.8 + 0.6) / 3,
                                                     "2": (0.2 + 0.3 + 0.4) / 3})
  assert summary["base_accuracy"] == 0.4  # its own step-0 evaluation
  assert summary["gain"] == pytest.approx((0.5 + 0.7 + 0.6) / 3 - 0.4)
  assert summary["rollouts"] == 60 and summary["steps"] == 6
  assert summary["accuracy_text_only"] == 0.3 and summary["wall_s"] == 12.0
  # Against a baseline given from elsewhere (the baseline arm of the same seed).
  assert sweep.summarize_run(run, 3, base_accuracy=0.5)["gain"] == pytest.approx(0.1)


def test_arm_statistics_are_mean_and_sample_std_over_seeds():
  def run(final, level1, wall):
    return {"final_accuracy": final, "gain": final - 0.5, "base_accuracy": 0.5,
            "accuracy_with_images": final, "accuracy_text_only": None, "wall_s": wall,
            "final_by_level": {"1": level1}, "rollouts": 100, "steps": 10}
  arm = sweep.aggregate_arm([run(0.6, 0.9, 60.0), run(0.7, 0.8, 66.0), run(0.8, 1.0, 63.0)])
  assert arm["n_seeds"] == 3
  assert arm["final_accuracy"]["mean"] == pytest.approx(0.7)
  # sqrt(((0.6-0.7)^2 + 0 + (0.8-0.7)^2) / (3 - 1)) = 0.1
  assert arm["final_accuracy"]["std"] == pytest.approx(0.1)
  assert arm["gain"]["mean"] == pytest.approx(0.2)
  assert arm["by_level"]["1"]["mean"] == pytest.approx(0.9)
  assert arm["by_level"]["1"]["std"] == pytest.approx(0.1)
  assert arm["wall_s"]["std"] == pytest.approx(3.0)
  assert arm["accuracy_text_only"] == {"n": 0, "mean": None, "std": None, "values": []}
  assert sweep.mean_std([0.5])["std"] is None  # one seed: no spread


def test_random_subset_is_deterministic_uniform_and_of_the_asked_size():
  pool = list(range(100))
  a = sweep.random_subset(pool, 10, seed=0)
  assert a == sweep.random_subset(pool, 10, seed=0)
  assert a != sweep.random_subset(pool, 10, seed=1)
  assert len(set(a)) == 10 and a == sorted(a)
  with pytest.raises(sweep.SweepError):
    sweep.random_subset(pool, 101, seed=0)


def test_write_random_subset_round_trips_records(tmp_path):
  from dprl.data import readers
  from dprl.data.synthetic import generate_split
  records = generate_split("count_color", "train", 12, 0)
  readers.write_jsonl(records, tmp_path / "pool.jsonl")
  sweep.write_random_subset(tmp_path / "pool.jsonl", 5, 3, tmp_path / "out" / "random.jsonl")
  subset = readers.read_records(str(tmp_path / "out" / "random.jsonl"), layout="dprl")
  assert [r.id for r in subset] == [r.id for r in sweep.random_subset(records, 5, 3)]
  assert subset[0].images == sweep.random_subset(records, 5, 3)[0].images


# ---------------------------------------------------------------------------------------
# Config: runs, seeds, names
# ---------------------------------------------------------------------------------------


def test_a_run_sets_its_seed_in_every_phase_and_resolves_the_workdir_and_base(tmp_path):
  config = load_config(f"{ROOT}/configs/experiments/infi_mmr.py:tiny")
  run = sweep.run_config(config, "three_phase", 7, tmp_path)
  assert run.base_checkpoint == str(tmp_path / "base" / "warm_start" / "checkpoints")
  for name in run.phase_order:
    assert run.phases[name].train.seed == 7 and run.phases[name].train.data.seed == 7
  dp = load_config(f"{ROOT}/configs/experiments/difficulty_prior.py:tiny")
  curated = sweep.run_config(dp, "curated_exp", 1, tmp_path)
  assert curated.phases.grpo.train.data.path == str(tmp_path / "base" / "curate" / "kept.jsonl")
  assert curated.phases.grpo.train.rl.difficulty_weighting == "exp"


def test_sweep_level_overrides_reach_every_arm():
  config = load_config(f"{ROOT}/configs/experiments/difficulty_prior.py:cpu_demo")
  config.total_steps = 90
  config.best_weighting = "linear"
  resolved = config.copy_and_resolve_references()
  assert resolved.arms.curated.phases.grpo.train.total_steps == 90
  stages = resolved.arms.two_stage_hints.phases
  assert (stages.stage1.train.total_steps, stages.stage2.train.total_steps) == (60, 30)
  assert stages.stage1.train.rl.difficulty_weighting == "linear"
  assert stages.stage2.train.rl.difficulty_weighting == "linear"
  infi = load_config(f"{ROOT}/configs/experiments/infi_mmr.py:cpu_demo")
  infi = infi.copy_and_resolve_references()
  three = infi.arms.three_phase.phases
  assert sum(three[n].train.total_steps for n in infi.arms.three_phase.phase_order) == \
      infi.arms.multimodal_only.phases.multimodal.train.total_steps


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_held_out_tasks_follow_the_training_tasks(experiment):
  config = load_config(f"{ROOT}/configs/experiments/{experiment}.py:cpu_demo")
  grpo = load_config(f"{ROOT}/configs/grpo.py:cpu_demo")
  for name in config.arms.keys():
    arm = config.arms[name]
    assert arm.eval.tasks == grpo.data.tasks, name
    for phase in arm.phase_order:
      train = arm.phases[phase].train
      assert (train.eval.synthetic_tasks or train.data.tasks) == grpo.data.tasks, (name, phase)
  for recipe in ("difficulty_prior", "infi_mmr"):
    assert load_config(f"{ROOT}/configs/{recipe}.py:cpu_demo").eval.tasks == grpo.data.tasks


def test_an_unknown_arm_is_named(tmp_path):
  config = _tiny_sweep()
  config.arm_order = "one_phase,three_phase"
  with pytest.raises(sweep.SweepError, match=r"\['three_phase'\].*one_phase.*two_phase"):
    sweep.run_sweep(config, str(tmp_path))
  config.arm_order = ""
  config.baseline_arm = "nope"
  with pytest.raises(sweep.SweepError, match="baseline_arm = 'nope'"):
    sweep.run_sweep(config, str(tmp_path))


def test_a_misspelt_override_names_the_key(tmp_path):
  cmd = [sys.executable, "-m", "dprl.sweep",
         f"--config={ROOT}/configs/experiments/rap.py:tiny", f"--workdir={tmp_path}",
         "--config.arms.rapp.phases.grpo.train.total_steps=3"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "config.arms has no 'rapp'" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("variant", ["tiny", "cpu_demo"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_dry_run_prints_the_plan_and_trains_nothing(experiment, variant, tmp_path, capsys):
  config = load_config(f"{ROOT}/configs/experiments/{experiment}.py:{variant}")
  config.dry_run = True
  plan = sweep.run_sweep(config, str(tmp_path))["plan"]
  out = capsys.readouterr().out
  arms = config.arm_order.split(",")
  assert len(plan) == len(arms) * len(config.seeds.split(","))
  for arm in arms:
    assert arm in out
  assert "rollouts" in out and "0/" in out
  assert all(r["rollouts"] == sum(p["steps"] * p["rollouts_per_step"] for p in r["phases"])
             for r in plan)
  assert not any(tmp_path.iterdir())


def test_dry_run_from_the_command_line(tmp_path):
  cmd = [sys.executable, "-m", "dprl.sweep",
         "--config", f"{ROOT}/configs/experiments/difficulty_prior.py:cpu_demo",
         f"--workdir={tmp_path / 'x'}", "--config.dry_run=True", "--config.seeds=0,1"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "7 arms x 2 seeds = 14 runs" in proc.stdout
  assert "two_stage_hints" in proc.stdout and "curated_steep_exp" in proc.stdout
  assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------
# End to end: a tiny sweep, killed during its second run, then resumed; the experiments
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the module's sweeps (the same tiny shapes
  compile once); run_sweep leaves a configured cache alone."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  yield
  jax.config.update("jax_compilation_cache_dir", None)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
  from dprl import train as train_lib
  workdir = tmp_path_factory.mktemp("sweep")
  real_train = train_lib.train
  killed = workdir / "one_phase" / "seed1" / "grpo"

  def train_then_die(config, run_dir, **kwargs):
    if pathlib.Path(run_dir).resolve() != killed.resolve():
      return real_train(config, run_dir, **kwargs)
    shorter = config.copy_and_resolve_references()
    shorter.total_steps = 1  # one step (checkpointed: checkpoint.every = 1), then a "kill"
    real_train(shorter, run_dir, **kwargs)
    raise KeyboardInterrupt

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_lib, "train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
      sweep.run_sweep(_tiny_sweep(), str(workdir))
  first = workdir / "one_phase" / "seed0" / "grpo" / "metrics.jsonl"
  before = {"first_mtime": first.stat().st_mtime_ns, "first_rows": first.read_text(),
            "killed_marker": json.loads((killed.parent / sweep.RUN_FILE).read_text()),
            "killed_rows": [json.loads(l)["step"] for l in (killed / "metrics.jsonl").open()]}
  results = sweep.run_sweep(_tiny_sweep(), str(workdir))
  return workdir, before, results


@pytest.mark.slow
def test_tiny_sweep_writes_results_table_and_plot(killed_and_resumed):
  workdir, _, results = killed_and_resumed
  assert results == json.loads((workdir / "results.json").read_text())
  assert list(results["arms"]) == ["one_phase", "two_phase"]
  assert results["missing"] == []
  for name, arm in results["arms"].items():
    assert arm["n_seeds"] == 2 and [r["seed"] for r in arm["runs"]] == [0, 1]
    assert 0.0 <= arm["final_accuracy"]["mean"] <= 1.0 and arm["final_accuracy"]["std"] is not None
    assert arm["by_level"] and arm["wall_s"]["n"] == 2
    assert arm["rollouts"] == 2 * 8 * 4  # steps x prompts x samples
    for run in arm["runs"]:
      assert [p["step"] for p in run["curve"]] == [0, 1, 2], name
      assert [p["rollouts"] for p in run["curve"]] == [0, 32, 64]
      values = [p["accuracy"] for p in run["curve"]]
      assert run["final_accuracy"] == pytest.approx(np.mean(values))
      assert 0.0 <= run["accuracy_text_only"] <= 1.0
      assert run["wall_s"] > 0
  assert [p["phase"] for p in results["arms"]["two_phase"]["runs"][0]["curve"]] == ["a", "b", "b"]
  # Same seed, same base: every arm's step 0 is the base checkpoint on the same items.
  for seed in (0, 1):
    starts = {arm["runs"][seed]["curve"][0]["accuracy"] for arm in results["arms"].values()}
    assert starts == {results["base"]["accuracy_by_seed"][str(seed)]}
  table = (workdir / "results.md").read_text()
  assert "| arm | seeds | final accuracy | gain over base | text-only |" in table
  assert "| one_phase | 2 |" in table and "| two_phase | 2 |" in table
  assert "by difficulty level" in table
  assert (workdir / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_killed_sweep_resumes_without_retraining_finished_runs(killed_and_resumed):
  workdir, before, _ = killed_and_resumed
  first = workdir / "one_phase" / "seed0" / "grpo" / "metrics.jsonl"
  assert first.stat().st_mtime_ns == before["first_mtime"]
  assert first.read_text() == before["first_rows"]
  assert before["killed_marker"]["done"] is False and len(before["killed_marker"]["attempts"]) == 1
  assert before["killed_rows"] == [0, 1]
  marker = json.loads((workdir / "one_phase" / "seed1" / sweep.RUN_FILE).read_text())
  assert marker["done"] and len(marker["attempts"]) == 2
  assert marker["wall_s"] == pytest.approx(sum(marker["attempts"]), abs=0.2)
  # Resumed from its step-1 checkpoint: steps 0 and 1 kept, step 2 trained once.
  resumed = workdir / "one_phase" / "seed1" / "grpo" / "metrics.jsonl"
  assert [json.loads(l)["step"] for l in resumed.open()] == [0, 1, 2]


@pytest.mark.slow
def test_a_finished_run_with_changed_settings_is_an_error(killed_and_resumed):
  workdir, _, _ = killed_and_resumed
  config = _tiny_sweep()
  config.arms.one_phase.phases.grpo.train.rl.difficulty_weighting = "exp"
  with pytest.raises(sweep.SweepError, match=r"phases\.grpo\.train\.rl\.difficulty_weighting: "
                                             r"'none' -> 'exp'"):
    sweep.run_sweep(config, str(workdir))


@pytest.mark.slow
@pytest.mark.parametrize("experiment,arms", [("difficulty_prior", "two_stage_hints"),
                                             ("rap", "rap,random"),
                                             ("infi_mmr", "three_phase,multimodal_only")])
def test_an_experiments_tiny_variant_prepares_its_base_and_runs(experiment, arms, tmp_path):
  config = load_config(f"{ROOT}/configs/experiments/{experiment}.py:tiny")
  config.seeds = "0"
  config.arm_order = arms
  results = sweep.run_sweep(config, str(tmp_path))
  assert list(results["arms"]) == arms.split(",") and results["missing"] == []
  prepared = results["base"]["prepared"]
  if experiment == "difficulty_prior":  # curation fed both stages
    sizes = {k: v["size"] for k, v in prepared["curate"].items()}
    assert sizes["kept"] == sizes["stage1"] + sizes["stage2"] and sizes["stage2"] >= 8
  if experiment == "rap":  # the selection and a random subset of its size
    select = prepared["select"]
    assert select["random"]["size"] == select["selected"]["size"] >= 8
    assert (tmp_path / "base" / "rap" / "decisions.jsonl").exists()
  base = results["base"]["accuracy_by_seed"]["0"]
  for name, arm in results["arms"].items():
    run = arm["runs"][0]
    assert run["final_accuracy"] is not None and run["accuracy_text_only"] is not None, name
    assert run["base_accuracy"] == base
    assert run["gain"] == pytest.approx(run["final_accuracy"] - base)
