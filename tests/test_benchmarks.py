"""Smoke tests of the benchmark scripts: they run (quick, small configs) and write their JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_grpo_step_benchmark_quick_tiny_writes_its_json(tmp_path):
  out = tmp_path / "grpo_step.json"
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "grpo_step.py"), "--quick",
         "--configs", "tiny", "--json", str(out)]
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
  env.pop("XLA_FLAGS", None)  # one CPU device with all cores, as the benchmark measures
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "update_fraction_of_matmul" in proc.stdout  # the table
  result = json.loads(out.read_text())
  assert result["matmul_flops_per_s"] > 0
  assert set(result["configs"]) == {"tiny"}
  tiny = result["configs"]["tiny"]
  for key in ("step_tokens_per_s", "update_tokens_per_s", "update_flops_per_s",
              "update_fraction_of_matmul", "compile_s"):
    assert key in tiny, key
    assert tiny[key] >= 0, (key, tiny[key])
  for key in ("step_tokens_per_s", "update_tokens_per_s", "update_flops_per_s",
              "update_fraction_of_matmul"):
    assert tiny[key] > 0, (key, tiny[key])
  assert tiny["update_fraction_of_matmul"] == pytest.approx(
      tiny["update_flops_per_s"] / result["matmul_flops_per_s"])
  # The jaxpr count (scan bodies times their length) agrees with the analytic formula.
  assert tiny["update_flops"] == pytest.approx(tiny["update_flops_analytic"], rel=0.1)


@pytest.mark.slow
def test_sampler_benchmark_quick_tiny_writes_its_json(tmp_path):
  out = tmp_path / "sampler.json"
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "sampler.py"), "--quick",
         "--configs", "tiny", "--rounds", "2", "--repeats", "1", "--json", str(out)]
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "speedup_vs_transformers" in proc.stdout  # the table
  tiny = json.loads(out.read_text())["configs"]["tiny"]
  for key in ("dprl_tokens_per_s", "transformers_tokens_per_s", "peak_rss_mb"):
    assert tiny[key] > 0, key
  # The best of the alternating rounds is what is reported, and the ratio is of those.
  assert len(tiny["rounds_tokens_per_s"]["dprl"]) == 2
  assert tiny["dprl_tokens_per_s"] == max(tiny["rounds_tokens_per_s"]["dprl"])
  assert tiny["speedup_vs_transformers"] == pytest.approx(
      tiny["dprl_tokens_per_s"] / tiny["transformers_tokens_per_s"])
