"""`python -m dprl.train` on the tiny config: metrics, checkpoints, exact resume after
SIGTERM, NaN stop, starting from earlier runs, warm start, and config errors.

The tests that train are marked slow (each is 20-50 s on 2 busy cores, most of it the
first compile); the config and flag tests are fast.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from dprl import metrics as metrics_lib
from dprl import train as train_lib
from dprl.models import qwen2_5_vl
from dprl.rl import checkpointing
from dprl.rl import train_state as train_state_lib
from dprl.rl.rewards import REWARD_FNS

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "grpo.py"
REQUIRED_KEYS = ("step", "loss", "reward_mean", "accuracy", "kl", "clip_frac",
                 "response_len", "tokens_per_s")
TIMING_KEYS = ("sample_time_s", "update_time_s", "step_time_s", "tokens_per_s")
P, G = 4, 4  # prompts per step, samples per prompt: 16 reward calls per step

# The test reward: the fraction of digit characters, so a random tiny model gets varied
# rewards (non-zero advantages) from its first step. Hooks send SIGTERM or return NaN
# at a given call.
HOOKS = {"calls": 0, "sigterm_at": None, "nan_from": None}


def digit_fraction_reward(response: str, reference: str) -> tuple[float, bool]:
  HOOKS["calls"] += 1
  if HOOKS["sigterm_at"] == HOOKS["calls"]:
    os.kill(os.getpid(), signal.SIGTERM)
  if HOOKS["nan_from"] is not None and HOOKS["calls"] >= HOOKS["nan_from"]:
    return float("nan"), False
  return sum(c.isdigit() for c in response) / max(len(response), 1), reference in response


if "test_digit_fraction" not in REWARD_FNS:
  REWARD_FNS.register("test_digit_fraction")(digit_fraction_reward)


@pytest.fixture(autouse=True)
def reset_hooks():
  HOOKS.update(calls=0, sigterm_at=None, nan_from=None)
  yield
  HOOKS.update(calls=0, sigterm_at=None, nan_from=None)


def load_config(variant: str = "tiny"):
  spec = importlib.util.spec_from_file_location("grpo_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


# The tiny variant, smaller still and on a (2, 2, 2) mesh of the 8 test devices.
TEST_OVERRIDES = {
    "data.num_items": 64, "data.rollout_batch_size": P, "sampling.num_samples": G,
    "rl.micro_batch_size": 8, "rl.reward_fn": "test_digit_fraction", "rl.beta": 0.01,
    "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "checkpoint.every": 2,
    "logging.progress": False,
}


def tiny_config(**overrides):
  config = load_config("tiny")
  for key, value in {**TEST_OVERRIDES, **overrides}.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    setattr(node, leaf, value)
  return config


def comparable(row):
  return {k: v for k, v in row.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
  """Four steps in one go (the reference for the resume test)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  HOOKS.update(calls=0)
  result = train_lib.train(tiny_config(total_steps=4), workdir)
  return workdir, result


# ---------------------------------------------------------------------------------------
# Config and flags
# ---------------------------------------------------------------------------------------


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "dprl.train", f"--config={CONFIG_FILE}:tiny",
       f"--workdir={tmp_path}", "--config.rl.betaa=0.1"],
      capture_output=True, text=True, cwd=REPO, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert completed.returncode != 0
  assert "unknown config key 'rl.betaa'" in completed.stderr
  assert "'beta'" in completed.stderr  # the keys that do exist are listed
  assert not os.listdir(tmp_path)


def test_flag_errors_in_process_name_the_key(tmp_path, capsys):
  argv = ["train", f"--config={CONFIG_FILE}:tiny", f"--workdir={tmp_path}",
          "--config.optim.lr=1e-3"]
  flag_values = flags.FlagValues()
  train_lib.define_flags(flag_values, argv)
  with pytest.raises(SystemExit):
    train_lib.parse_flags(argv, flag_values)
  assert "unknown config key 'optim.lr'" in capsys.readouterr().err


def test_config_variants_are_locked_and_real_sizes_follow_easyr1():
  for variant in ("tiny", "qwen2_5_vl_3b", "qwen2_5_vl_7b"):
    config = load_config(variant)
    with pytest.raises(AttributeError):
      config.rl.betaa = 1.0
    train_lib.validate(config)
  config = load_config("qwen2_5_vl_7b")
  assert config.optim.learning_rate == 1e-6 and config.optim.weight_decay == 1e-2
  assert config.optim.max_grad_norm == 1.0
  assert (config.rl.beta, config.rl.kl_estimator) == (1e-2, "k3")
  assert config.data.rollout_batch_size == 512 and config.rl.update_batch_size == 128
  assert 5 <= config.sampling.num_samples <= 8
  assert config.sampling.max_new_tokens == config.data.max_prompt_length == 2048
  assert (config.data.min_pixels, config.data.max_pixels) == (262144, 4194304)
  assert config.model.preset == "qwen2_5_vl_7b"
  assert load_config("qwen2_5_vl_3b").model.preset == "qwen2_5_vl_3b"
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    load_config("huge")


def test_bad_values_are_named_before_anything_runs(tmp_path):
  with pytest.raises(ValueError, match="reward function 'nope'"):
    train_lib.train(tiny_config(**{"rl.reward_fn": "nope"}), str(tmp_path))
  with pytest.raises(ValueError, match="rl.update_batch_size = 3"):
    train_lib.train(tiny_config(**{"rl.update_batch_size": 3}), str(tmp_path))


# ---------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_writes_metrics_tensorboard_and_checkpoints(tmp_path):
  argv = ["train", f"--config={CONFIG_FILE}:tiny", f"--workdir={tmp_path}",
          *[f"--config.{k}={v}" for k, v in TEST_OVERRIDES.items()],
          "--config.total_steps=2", "--config.logging.progress=True"]
  flag_values = flags.FlagValues()
  train_lib.define_flags(flag_values, argv)
  train_lib.parse_flags(argv, flag_values)
  result = train_lib.train_from_flags(flag_values)
  assert result.step == 2 and not result.preempted
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert [row["step"] for row in rows] == [1, 2]
  for row in rows:
    assert set(REQUIRED_KEYS) <= set(row)
    assert all(math.isfinite(row[key]) for key in REQUIRED_KEYS)
  assert any(r["reward_mean"] > 0 for r in rows)
  assert os.listdir(tmp_path / "tensorboard")
  assert checkpointing.find_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoints"), 2)
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 2


@pytest.mark.slow
def test_resume_after_sigterm_repeats_the_uninterrupted_run_exactly(uninterrupted_run,
                                                                    tmp_path):
  reference_dir, reference = uninterrupted_run
  reference_rows = metrics_lib.read_metrics(reference_dir)
  assert [r["step"] for r in reference_rows] == [1, 2, 3, 4]
  assert any(r["loss"] != 0 for r in reference_rows) and all(r["kl"] >= 0
                                                            for r in reference_rows)

  # SIGTERM arrives during step 2's scoring: the step finishes, is saved, the run stops.
  HOOKS.update(calls=0, sigterm_at=G * P + 1)
  first = train_lib.train(tiny_config(total_steps=4), str(tmp_path))
  assert first.preempted and first.step == 2
  assert checkpointing.find_checkpoint(str(tmp_path))[1] == 2
  HOOKS.update(sigterm_at=None)
  second = train_lib.train(tiny_config(total_steps=4), str(tmp_path))
  assert not second.preempted and second.step == 4
  assert [r["step"] for r in second.metrics] == [3, 4]  # nothing done twice

  rows = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for got, want in zip(rows, reference_rows):
    assert comparable(got) == comparable(want), got["step"]
  for a, b in zip(jax.tree.leaves(jax.device_get(second.state.params)),
                  jax.tree.leaves(jax.device_get(reference.state.params))):
    np.testing.assert_array_equal(a, b)


def test_metrics_of_steps_after_the_checkpoint_are_not_kept_twice(tmp_path):
  # A run that died after logging step 3 but before saving it: step 3 is redone.
  with metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
    for step in (1, 2, 3):
      writer.write(step, {"loss": float(step)})
  with metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=2) as writer:
    writer.write(3, {"loss": 30.0})
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  assert metrics_lib.non_finite({"a": 1.0, "b": float("nan"), "c": np.float32("inf"),
                                 "d": "text"}) == ["b", "c"]


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_step_and_metric(tmp_path):
  HOOKS.update(calls=0, nan_from=2 * G * P + 1)  # rewards of step 3 are NaN
  with pytest.raises(train_lib.NonFiniteMetricError,
                     match=r"step 3: loss is nan .*last good checkpoint is step 2"):
    train_lib.train(tiny_config(total_steps=6), str(tmp_path))
  assert checkpointing.find_checkpoint(str(tmp_path))[1] == 2
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3] and math.isnan(rows[-1]["loss"])


@pytest.mark.slow
def test_new_runs_start_from_an_orbax_run_or_a_hugging_face_folder(uninterrupted_run,
                                                                   tmp_path):
  reference_dir, reference = uninterrupted_run
  want = jax.device_get(reference.state.params)
  started = train_lib.train(tiny_config(total_steps=0,
                                        **{"model.init_checkpoint": reference_dir}),
                            str(tmp_path / "from_orbax"))
  assert started.step == 0
  for a, b in zip(jax.tree.leaves(jax.device_get(started.state.params)),
                  jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)

  graphdef, _, rest = train_state_lib.split_params(qwen2_5_vl.abstract(
      train_lib.init_model(tiny_config(), train_lib.load_tokenizer("small", reference_dir),
                           train_lib.make_mesh(2, 2, 2), None)[0]))
  from flax import nnx  # pylint: disable=g-import-not-at-top
  hf_dir = str(tmp_path / "hf")
  qwen2_5_vl.save_pretrained(nnx.merge(graphdef, reference.state.params, rest), hf_dir)
  started = train_lib.train(tiny_config(total_steps=0, **{"model.init_checkpoint": hf_dir}),
                            str(tmp_path / "from_hf"))
  for a, b in zip(jax.tree.leaves(jax.device_get(started.state.params)),
                  jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=0, atol=0)
  with pytest.raises(FileNotFoundError, match="model.init_checkpoint"):
    train_lib.train(tiny_config(**{"model.init_checkpoint": str(tmp_path / "missing")}),
                    str(tmp_path / "bad"))


@pytest.mark.slow
def test_warm_start_then_rl(tmp_path):
  config = tiny_config(total_steps=1, **{"sft.steps": 3, "sft.warmup_steps": 1,
                                         "sft.learning_rate": 3e-3})
  result = train_lib.train(config, str(tmp_path))
  assert result.step == 1
  sft_rows = metrics_lib.read_metrics(str(tmp_path / "sft_metrics.jsonl"))
  assert [r["step"] for r in sft_rows] == [1, 2, 3]
  assert sft_rows[-1]["loss"] < sft_rows[0]["loss"]
  # Step 0 (after the warm start) is saved, so a restart does not repeat it.
  with checkpointing.Checkpointer(str(tmp_path / "checkpoints")) as checkpointer:
    assert 0 in checkpointer.all_steps()
