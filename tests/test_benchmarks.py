"""Smoke tests of the benchmark scripts: they run (quick, small configs) and write their JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str) -> str:
  """Runs benchmarks/<script> with `args` on one CPU device with all cores (as the
  benchmarks measure: no virtual devices) and returns its stdout; fails on a non-zero exit."""
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


@pytest.mark.slow
def test_grpo_step_benchmark_quick_tiny_writes_its_json(tmp_path):
  out = tmp_path / "grpo_step.json"
  stdout = run_benchmark("grpo_step.py", "--quick", "--configs", "tiny", "--json", str(out))
  assert "update_fraction_of_matmul" in stdout  # the table
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
  stdout = run_benchmark("sampler.py", "--quick", "--configs", "tiny", "--rounds", "2", "--repeats", "1",
                         "--json", str(out))
  assert "speedup_vs_transformers" in stdout  # the table
  tiny = json.loads(out.read_text())["configs"]["tiny"]
  for key in ("dprl_tokens_per_s", "transformers_tokens_per_s", "peak_rss_mb"):
    assert tiny[key] > 0, key
  # The best of the alternating rounds is what is reported, and the ratio is of those.
  assert len(tiny["rounds_tokens_per_s"]["dprl"]) == 2
  assert tiny["dprl_tokens_per_s"] == max(tiny["rounds_tokens_per_s"]["dprl"])
  assert tiny["speedup_vs_transformers"] == pytest.approx(
      tiny["dprl_tokens_per_s"] / tiny["transformers_tokens_per_s"])


@pytest.mark.slow
def test_sampler_device_benchmark_runs_tiny_on_cpu_against_transformers(tmp_path):
  # The script is for accelerators (3B shapes in bf16); on CPU with the tiny preset it
  # checks that it runs end to end and that its numbers are consistent with each other.
  out = tmp_path / "sampler_device.json"
  stdout = run_benchmark("sampler_device.py", "--preset", "tiny", "--prompts", "2", "--samples", "2",
                         "--new_tokens", "8", "--image_px", "112", "--prompt_text", "4", "--repeats", "1",
                         "--bandwidth_gib", "0.125", "--reference", "transformers", "--json", str(out))
  assert "bandwidth_fraction" in stdout  # the table
  result = json.loads(out.read_text())
  dprl, reference = result["results"]
  assert (dprl["engine"], reference["engine"]) == ("dprl", "transformers")
  assert dprl["rows"] == reference["rows"] == 4 and dprl["new_tokens"] == 8
  assert dprl["tokens_per_s"] == pytest.approx(4 * 8 / dprl["seconds"])
  # Timings are not asserted (a step of the tiny model is within the noise); the byte
  # counts are analytic: the decoder's weights and LM head, and the cache's slots.
  assert dprl["weight_gib"] > 0 and dprl["kv_cache_gib"] > 0
  bytes_per_step = (dprl["weight_gib"] + dprl["kv_cache_gib"]) * 2**30
  assert dprl["achieved_gb_per_s"] == pytest.approx(bytes_per_step / (dprl["decode_step_ms"] / 1e3) / 1e9)
  assert dprl["bandwidth_fraction"] == pytest.approx(dprl["achieved_gb_per_s"] / result["copy_bandwidth_gb_per_s"])
  assert result["decode_step_speedup_vs_transformers"] == pytest.approx(
      reference["decode_step_ms"] / dprl["decode_step_ms"])
