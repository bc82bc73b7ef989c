"""The README's main job runs end to end (on a shrunken config) and resumes."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_all_stages_and_writes_its_outputs(tmp_path):
  cmd = [sys.executable, "-m", "dprl.demo", f"--workdir={tmp_path}", "--config.sft.steps=3",
         "--config.sft.batch_size=16", "--config.total_steps=2", "--config.eval.every=1",
         "--config.eval.num_items=16", "--config.eval.batch_size=16", "--curate_items=32",
         "--curate_samples=4", "--config.logging.progress=False"]
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's laptop
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Held-out greedy accuracy" in proc.stdout
  for name in ("summary.json", "curves.png", "curate/histogram.png", "grpo/metrics.jsonl",
               "warm_start/sft_metrics.jsonl"):
    assert (tmp_path / name).exists(), name
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [p["step"] for p in summary["eval_curve"]] == [0, 1, 2]
  assert 0.0 <= summary["after_rl"]["accuracy"] <= 1.0
  # Rerun: every stage is found done, nothing is trained again.
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
  assert again.returncode == 0, again.stderr[-4000:]
  rows = [json.loads(l) for l in open(tmp_path / "grpo" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [0, 1, 2]
