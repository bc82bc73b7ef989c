"""`python -m dprl.plan`: per-device bytes of a GRPO run from abstract arrays and XLA's
memory analysis, without the hardware (and without materialising any weights)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from dprl import cli
from dprl import plan as plan_lib
from dprl.models.config import get_preset

REPO = pathlib.Path(__file__).resolve().parents[1]
FLOAT32 = 4


def recipe(variant: str, **overrides):
  config = cli.load_config(f"configs/grpo.py:{variant}")
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    setattr(node, leaf, value)
  return config


def qwen2_5_vl_parameters(cfg) -> tuple[int, int]:
  """(matrix, vector) parameter counts of Qwen2.5-VL, transcribed from transformers'
  modeling_qwen2_5_vl (not from dprl's model): matrices are the kernels and embeddings
  the partition rules shard, vectors the biases and norm scales they replicate."""
  t, v = cfg.text, cfg.vision
  d, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
  text_matrices = t.vocab_size * d + t.num_hidden_layers * (d * d + 2 * d * kv + d * d + 3 * d * t.intermediate_size)
  text_vectors = t.num_hidden_layers * (d + 2 * kv + 2 * d) + d  # q/k/v biases, 2 norms; final norm
  if not cfg.tie_word_embeddings:
    text_matrices += d * t.vocab_size
  h, i, merged = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size**2
  vision_matrices = (v.patch_dim * h + v.depth * (3 * h * h + h * h + 3 * h * i)
                     + merged * merged + merged * v.out_hidden_size)
  vision_vectors = (v.depth * (2 * h + 3 * h + h + 2 * i + h)  # norms, qkv/proj/gate/up/down biases
                    + h + merged + v.out_hidden_size)  # merger norm, fc1 and fc2 biases
  return text_matrices + vision_matrices, text_vectors + vision_vectors


def test_analytic_count_matches_the_released_checkpoints():
  # Parameter counts of the published safetensors (Qwen2.5-VL-3B/7B-Instruct).
  assert sum(qwen2_5_vl_parameters(get_preset("qwen2_5_vl_3b"))) == 3_754_622_976
  assert sum(qwen2_5_vl_parameters(get_preset("qwen2_5_vl_7b"))) == 8_292_166_656


@pytest.mark.parametrize("variant, preset, fsdp", [
    ("tiny", "tiny", 4),
    ("qwen2_5_vl_3b", "qwen2_5_vl_3b", 8),
    ("qwen2_5_vl_7b", "qwen2_5_vl_7b", 8),
])
def test_state_bytes_are_the_analytic_count_over_the_sharding(variant, preset, fsdp):
  # No compile: the abstract model's shardings alone. Every matrix of these presets
  # splits evenly over fsdp, so a device holds 1/fsdp of them and all of the vectors.
  config = recipe(variant, **{"mesh.data": 1, "mesh.fsdp": fsdp, "mesh.tensor": 1, "rl.beta": 0.01})
  result = plan_lib.plan(config, num_devices=fsdp, compile_functions=False)
  matrices, vectors = qwen2_5_vl_parameters(get_preset(preset))
  assert result["parameter_count"] == matrices + vectors
  per_device = (matrices // fsdp + vectors) * FLOAT32
  assert result["bytes"]["parameters"] == per_device
  assert result["bytes"]["reference_parameters"] == per_device  # rl.beta > 0 keeps a copy
  # AdamW's mu and nu follow their parameter's sharding; plus two int32 update counts
  # (Adam's and the learning-rate schedule's).
  assert result["bytes"]["optimizer_state"] == 2 * per_device + 2 * 4
  assert result["phases"] == {} and result["fits"] is None


def test_kv_cache_bytes_follow_the_samplers_sharding():
  config = recipe("qwen2_5_vl_7b", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                      "data.rollout_batch_size": 8, "rl.update_batch_size": 8,
                                      "data.max_prompt_length": 1000, "sampling.max_new_tokens": 24,
                                      "rl.micro_batch_size": 8})
  result = plan_lib.plan(config, num_devices=8, compile_functions=False)
  t = get_preset("qwen2_5_vl_7b").text
  # The pipeline pads prompts to at most max_prompt_length (its largest bucket), and the
  # sampler keeps the pipeline's widths: prompt + new tokens.
  slots = 1000 + 24
  rows = 8 * 8  # prompts x samples
  whole = 2 * t.num_hidden_layers * rows * slots * t.num_key_value_heads * t.head_dim * 2  # k, v; bfloat16
  assert result["bytes"]["kv_cache"] == whole // 2 // 2  # rows over data, heads over tensor
  assert result["settings"]["sampler_prompt_len"] == 1000


def test_a_mesh_of_more_devices_than_given_names_the_flags():
  config = recipe("tiny", **{"mesh.data": 1, "mesh.fsdp": 16, "mesh.tensor": 1})
  with pytest.raises(plan_lib.PlanError, match=r"--config.mesh.fsdp=16.* = 16 devices, but --num_devices=8"):
    plan_lib.plan(config, num_devices=8)
  config = recipe("tiny", **{"mesh.data": -1, "mesh.fsdp": 3})
  with pytest.raises(plan_lib.PlanError, match=r"--num_devices=8 is not a multiple of 3"):
    plan_lib.plan(config, num_devices=8)
  with pytest.raises(plan_lib.PlanError, match=r"-1 size: give --num_devices"):
    plan_lib.plan(config)
  # More devices than this process has (the tests run on 8).
  with pytest.raises(plan_lib.PlanError, match=r"--num_devices=16 but JAX has 8 devices"):
    plan_lib.plan(recipe("tiny", **{"mesh.data": 16}), num_devices=16)


def test_config_errors_name_the_field():
  with pytest.raises(plan_lib.PlanError, match="rl.micro_batch_size = 6 must be a positive multiple"):
    plan_lib.plan(recipe("tiny", **{"mesh.data": 4, "rl.micro_batch_size": 6}), num_devices=4)
  with pytest.raises(plan_lib.PlanError, match="--config.mesh.tensor=4 must divide the 2 key/value heads"):
    plan_lib.plan(recipe("tiny", **{"mesh.data": 1, "mesh.tensor": 4}), num_devices=4)
  with pytest.raises(plan_lib.PlanError, match="data.max_prompt_length = 4"):
    plan_lib.plan(recipe("tiny", **{"data.max_prompt_length": 4}), num_devices=8, compile_functions=False)


def test_cli_error_names_the_flag():
  completed = subprocess.run(
      [sys.executable, "-m", "dprl.plan", "--config", "configs/grpo.py:tiny", "--num_devices", "4",
       "--config.mesh.data=1", "--config.mesh.fsdp=8"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": ""})
  assert completed.returncode != 0
  assert "--config.mesh.fsdp=8 x --config.mesh.tensor=1 = 8 devices, but --num_devices=4" in completed.stderr


@pytest.mark.slow
def test_cli_compiles_the_tiny_run_and_writes_the_table_and_json(tmp_path):
  out = tmp_path / "plan.json"
  completed = subprocess.run(
      [sys.executable, "-m", "dprl.plan", "--config", "configs/grpo.py:tiny", "--num_devices", "4",
       "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.rl.beta=0.01", "--device_memory_gib=1",
       f"--json={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": ""})
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["num_devices"] == 4 and result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  matrices, vectors = qwen2_5_vl_parameters(get_preset("tiny"))
  assert result["bytes"]["parameters"] == (matrices // 4 + vectors) * FLOAT32
  assert set(result["phases"]) == set(plan_lib.PHASES)
  for name in plan_lib.PHASES:
    memory = result["compiled"][name]
    assert memory["temp"] > 0 and result["phases"][name] >= memory["total"]
  # The update's live set holds the parameters, the accumulator and the optimizer state.
  assert result["phases"]["update"] >= (result["bytes"]["parameters"] + result["bytes"]["gradient_accumulator"]
                                        + result["bytes"]["optimizer_state"])
  assert result["fits"] is True and result["peak_bytes"] == max(result["phases"].values())
  assert "| parameters |" in completed.stdout and "fits" in completed.stdout


@pytest.mark.slow
def test_a_real_preset_compiles_ahead_of_time_with_small_batches():
  # 7B, text only, short sequences, on the tests' 8 devices: what each phase needs comes
  # from XLA in well under a minute on a CPU, without a byte of weights.
  config = recipe("qwen2_5_vl_7b", **{
      "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4, "data.rollout_batch_size": 8,
      "rl.update_batch_size": 2, "data.max_prompt_length": 512, "sampling.max_new_tokens": 512,
      "rl.micro_batch_size": 2, "rl.logprob_micro_batch_size": 2, "model.remat_policy": "full"})
  result = plan_lib.plan(config, num_devices=8, images_per_prompt=0, device_memory_gib=32)
  matrices, vectors = qwen2_5_vl_parameters(get_preset("qwen2_5_vl_7b"))
  assert result["parameter_count"] == matrices + vectors
  assert set(result["phases"]) == set(plan_lib.PHASES) and result["fits"] is not None
  # The KV cache is a temporary of the sampler: XLA's count includes it.
  assert result["bytes"]["temporaries_sampling"] >= result["bytes"]["kv_cache"]


@pytest.mark.slow
def test_residual_rows_over_fsdp_cut_the_update_temporaries(monkeypatch):
  # Without the activation rule XLA splits the micro-batch's activations over the hidden
  # size (following the weights), so each of the 8 fsdp devices computes all 8 rows; with
  # it each computes its own. Tiny preset, 8 rows of 256 + 256 tokens, no remat.
  from dprl.models import sharding
  config = recipe("tiny", **{
      "mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1, "data.rollout_batch_size": 8,
      "rl.update_batch_size": 8, "data.max_prompt_length": 256, "sampling.max_new_tokens": 256,
      "rl.micro_batch_size": 8, "rl.logprob_micro_batch_size": 8, "model.remat_policy": "none"})
  temp = lambda: plan_lib.plan(config, num_devices=8, images_per_prompt=0)["compiled"]["update"]["temp"]
  constrained = temp()
  monkeypatch.delitem(sharding.ACTIVATION_RULES, "residual")
  unconstrained = temp()
  assert constrained < 0.65 * unconstrained, (constrained, unconstrained)
