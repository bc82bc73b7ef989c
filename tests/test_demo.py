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
         "--curate_samples=4", "--config.logging.progress=False",
         "--warm_start_margin=-1"]  # 3 steps cannot read the image: accept any warm start
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's laptop
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Held-out accuracy" in proc.stdout and "greedy before" in proc.stdout
  for name in ("summary.json", "curves.png", "curate/histogram.png", "grpo/metrics.jsonl",
               "warm_start/sft_metrics.jsonl"):
    assert (tmp_path / name).exists(), name
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert set(summary["metrics"]) == {"greedy", "sampled (T=1)"}
  for metric in summary["metrics"].values():
    assert [p["step"] for p in metric["curve"]] == [0, 1, 2]
    assert 0.0 <= metric["after_rl"] <= 1.0
    assert metric["gain"] == metric["after_rl"] - metric["before_rl"]
  assert "sampled (T=1)" in proc.stdout
  # Orbax's per-file INFO logs (hundreds of lines through absl) are kept out of the output.
  assert "_NonBlockingMetadataStore" not in proc.stderr and "atomicity.py" not in proc.stderr
  # Rerun: every stage is found done, nothing is trained again.
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
  assert again.returncode == 0, again.stderr[-4000:]
  rows = [json.loads(l) for l in open(tmp_path / "grpo" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [0, 1, 2]


def test_a_warm_start_that_ignores_the_image_is_retried_with_the_next_seed(tmp_path, monkeypatch):
  from dprl import demo  # pylint: disable=g-import-not-at-top
  from dprl import cli  # pylint: disable=g-import-not-at-top
  config = cli.load_config(os.path.join(ROOT, "configs", "grpo.py:cpu_demo"))
  seeds = []

  def fake_train(c, directory):
    seeds.append(c.seed)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "trained"), "w") as f:
      f.write(str(c.seed))

  accuracies = iter([0.30, 0.31, 0.52])  # the first two tries learn the answer prior only
  monkeypatch.setattr(demo.train_lib, "train", fake_train)
  monkeypatch.setattr(demo, "probe_warm_start", lambda c, d: {
      "accuracy": next(accuracies), "majority_answer_rate": 0.30})
  demo.run_warm_start(config, tmp_path, tries=4, margin=0.05)
  assert seeds == [config.seed, config.seed + 1, config.seed + 2]
  # Failed tries are kept, each with its probe; the kept one passed.
  for k in (0, 1):
    probe = json.loads((tmp_path / f"warm_start.failed{k}" / "probe.json").read_text())
    assert not probe["passed"] and probe["seed"] == config.seed + k
  assert json.loads((tmp_path / "warm_start" / "probe.json").read_text())["passed"]
  # Done: a rerun trains nothing.
  demo.run_warm_start(config, tmp_path, tries=4, margin=0.05)
  assert len(seeds) == 3


def test_no_warm_start_that_reads_the_image_is_an_error_naming_the_flag(tmp_path, monkeypatch):
  from dprl import demo  # pylint: disable=g-import-not-at-top
  from dprl import cli  # pylint: disable=g-import-not-at-top
  config = cli.load_config(os.path.join(ROOT, "configs", "grpo.py:cpu_demo"))
  monkeypatch.setattr(demo.train_lib, "train", lambda c, d: os.makedirs(d, exist_ok=True))
  monkeypatch.setattr(demo, "probe_warm_start", lambda c, d: {
      "accuracy": 0.3, "majority_answer_rate": 0.3})
  with pytest.raises(RuntimeError, match="--warm_start_tries"):
    demo.run_warm_start(config, tmp_path, tries=2, margin=0.05)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["warm_start.failed0", "warm_start.failed1"]
