"""The learner: exact micro-batch accumulation, sharding, image packing, filtering, SFT."""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dprl.models import qwen2_5_vl
from dprl.parallel.mesh import make_mesh
from dprl.rl import learner as learner_lib
from dprl.rl import losses
from dprl.rl import train_state as train_state_lib
from dprl.rl.logprobs import response_logprobs

PROMPT_LEN, RESPONSE_LEN = 20, 8
OPTIM = dict(learning_rate=1e-3, schedule="constant", warmup_steps=0, final_lr_ratio=0.0,
             weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def model():
  return qwen2_5_vl.init("tiny", seed=3)


def single_device_mesh():
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def make_rollout(cfg, rows=8, seed=0, grids=((1, 4, 4),)):
  """Left-padded prompts with one image each (grid cycling over `grids`) and responses."""
  rng = np.random.default_rng(seed)
  prompt_ids = rng.integers(10, 250, (rows, PROMPT_LEN)).astype(np.int32)
  prompt_mask = np.ones((rows, PROMPT_LEN), np.int32)
  images = []
  for row in range(rows):
    grid = np.array([grids[row % len(grids)]], np.int32)
    tokens = int(np.prod(grid)) // 4
    start = PROMPT_LEN - 4 - tokens
    prompt_ids[row, start - 1] = cfg.vision_start_token_id
    prompt_ids[row, start:start + tokens] = cfg.image_token_id
    prompt_ids[row, start + tokens] = cfg.vision_end_token_id
    pad = row % 3  # some rows left-padded
    prompt_ids[row, :pad] = 0
    prompt_mask[row, :pad] = 0
    patches = rng.normal(size=(int(np.prod(grid)), cfg.vision.patch_dim)).astype(np.float32)
    images.append((patches, grid))
  response_ids = rng.integers(10, 250, (rows, RESPONSE_LEN)).astype(np.int32)
  response_mask = np.ones((rows, RESPONSE_LEN), np.int32)
  for row in range(0, rows, 3):
    response_mask[row, 3 + row % 4:] = 0
  advantages = rng.normal(size=rows).astype(np.float32)
  return learner_lib.Rollout(prompt_ids, prompt_mask, response_ids, response_mask,
                             advantages, images)


def make_learner(model, mesh, optimizer, schedule=None, **config):
  graphdef, params, rest = train_state_lib.split_params(model)
  state = train_state_lib.create_train_state(params, optimizer, 0)
  shardings = train_state_lib.train_state_shardings(state, optimizer, mesh)
  # A copy: the learner donates its state, and the model's own arrays must survive.
  state = train_state_lib.tree_copy(train_state_lib.place(state, shardings), shardings)
  learner = learner_lib.Learner(graphdef, rest, model.config, optimizer,
                                schedule or optax.constant_schedule(0.0), mesh, shardings,
                                learner_lib.LearnerConfig(**config))
  return learner, state


@pytest.mark.slow
def test_accumulated_micro_batch_gradient_is_the_whole_batch_gradient(model):
  # SGD with lr 1 makes the update minus the gradient. Old and reference log-probs are
  # off the current ones so the ratio clips and the KL has a gradient; the aggregation
  # averages per sequence, which micro-batches must not change.
  rollout = make_rollout(model.config, rows=8)
  loss_config = learner_lib.LossConfig(eps_low=0.1, eps_high=0.1, clip_ratio_c=3.0,
                                       beta=0.1, kl_estimator="k3",
                                       aggregation="seq_mean_token_mean")
  learner, state = make_learner(model, single_device_mesh(), optax.sgd(1.0),
                                micro_batch_size=2, chunk_size=3, loss=loss_config)
  logp, _ = learner.logprobs(state.params, rollout)
  rng = np.random.default_rng(1)
  rollout.old_logp = logp + rng.normal(scale=0.3, size=logp.shape).astype(np.float32)
  rollout.ref_logp = logp + rng.normal(scale=0.3, size=logp.shape).astype(np.float32)
  before = jax.device_get(state.params)
  state, metrics = learner.update(state, rollout)
  after = jax.device_get(state.params)

  graphdef, _, rest = train_state_lib.split_params(model)
  batch = rollout.micro_batch(slice(0, 8), patch_dim=learner.patch_dim,
                              merge_size=learner.merge_size)

  def whole_batch_loss(params):
    m = nnx.merge(graphdef, params, rest)
    logp, _ = response_logprobs(m, batch["prompt_ids"], batch["prompt_mask"],
                                batch["response_ids"], batch["response_mask"],
                                batch["pixel_values"], batch["image_grid_thw"])
    total, denominator, _ = losses.policy_loss(
        logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
        batch["response_mask"].astype(bool), eps_low=0.1, eps_high=0.1, clip_ratio_c=3.0,
        beta=0.1, kl_estimator="k3", aggregation="seq_mean_token_mean")
    return losses.finalize(total, denominator)

  loss, grads = jax.jit(jax.value_and_grad(whole_batch_loss))(before)
  assert abs(float(metrics[0]["loss"]) - float(loss)) < 1e-6
  assert float(metrics[0]["clip_frac"]) > 0
  for b, a, g in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(grads)):
    np.testing.assert_allclose(b - a, np.asarray(g), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_step_on_eight_devices_gives_the_single_device_loss(model):
  # Two passes over the rollout: the second pass's loss depends on the first update, so
  # the optimizer and the sharded parameters must agree too.
  rollout = make_rollout(model.config, rows=8, seed=2)
  optimizer, schedule = train_state_lib.make_optimizer(OPTIM, 10)
  results = []
  for mesh in (single_device_mesh(), make_mesh(2, 2, 2)):
    learner, state = make_learner(model, mesh, optimizer, schedule, micro_batch_size=4,
                                  chunk_size=4)
    rollout.old_logp, _ = learner.logprobs(state.params, rollout)
    state, metrics = learner.update(state, rollout, num_iterations=2)
    results.append((learner_lib.mean_metrics(metrics[:1]), learner_lib.mean_metrics(
        metrics[1:]), jax.device_get(state.params)))
  (first_1, second_1, params_1), (first_8, second_8, params_8) = results
  for key in ("loss", "pg_loss", "grad_norm", "clip_frac", "entropy"):
    assert abs(first_1[key] - first_8[key]) < 1e-5, key
    assert abs(second_1[key] - second_8[key]) < 1e-5, key
  assert second_1["ratio"] != 1.0
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_padding_images_to_a_bucket_leaves_logprobs_unchanged(model):
  # Rows with images of different sizes: each micro-batch's patches are padded with a
  # dummy image (and empty grid rows) to power-of-two counts.
  rollout = make_rollout(model.config, rows=4, seed=3, grids=((1, 4, 4), (1, 4, 6), (1, 2, 2)))
  learner, state = make_learner(model, single_device_mesh(), optax.sgd(0.0),
                                micro_batch_size=2, chunk_size=4)
  logp, _ = learner.logprobs(state.params, rollout)
  batch = rollout.micro_batch(slice(0, 2), patch_dim=learner.patch_dim,
                              merge_size=learner.merge_size)
  assert batch["pixel_values"].shape[0] == 64 and batch["image_grid_thw"].shape[0] == 4
  for rows in (slice(0, 2), slice(2, 4)):
    exact_pv = np.concatenate([pv for pv, _ in rollout.images[rows]])
    exact_grid = np.concatenate([g for _, g in rollout.images[rows]])
    ref, _ = response_logprobs(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                               rollout.response_ids[rows], rollout.response_mask[rows],
                               exact_pv, exact_grid)
    valid = rollout.response_mask[rows].astype(bool)
    np.testing.assert_allclose(logp[rows][valid], np.asarray(ref)[valid], atol=1e-5)


def test_split_images_gives_each_row_its_own():
  grid = np.array([[1, 2, 2], [1, 4, 2], [1, 2, 4]], np.int32)
  pixel_values = np.arange(4 + 8 + 8)[:, None] * np.ones((1, 3), np.float32)
  rows = learner_lib.split_images(pixel_values, grid, [1, 0, 2])
  assert rows[1] is None
  np.testing.assert_array_equal(rows[0][0][:, 0], np.arange(4))
  np.testing.assert_array_equal(rows[2][0][:, 0], np.arange(4, 20))
  np.testing.assert_array_equal(rows[2][1], grid[1:])
  with pytest.raises(ValueError, match="num_images"):
    learner_lib.split_images(pixel_values, grid, [1, 1])
  assert learner_lib.split_images(None, None, [0, 0]) == [None, None]


def test_several_updates_need_old_logprobs(model):
  rollout = make_rollout(model.config, rows=4)
  learner, state = make_learner(model, single_device_mesh(), optax.sgd(0.0),
                                micro_batch_size=2)
  with pytest.raises(ValueError, match="old log-probs"):
    learner.update(state, rollout, num_iterations=2)
  with pytest.raises(ValueError, match="update batches"):
    learner.update(state, rollout, update_rows=3)


def test_micro_batch_size_must_split_over_data_and_fsdp(model):
  with pytest.raises(ValueError, match="rl.micro_batch_size = 6"):
    make_learner(model, make_mesh(2, 2, 2), optax.sgd(0.0), micro_batch_size=6)


def test_sft_step_lowers_the_cross_entropy(model):
  rollout = make_rollout(model.config, rows=4, seed=4)
  optimizer, schedule = train_state_lib.make_optimizer({**OPTIM, "learning_rate": 1e-2}, 5)
  learner, state = make_learner(model, single_device_mesh(), optimizer, schedule,
                                micro_batch_size=2)
  losses_seen = []
  for _ in range(4):
    state, metrics = learner_lib.sft_step(learner, state, rollout)
    losses_seen.append(metrics["loss"])
    assert metrics["nll"] == pytest.approx(metrics["loss"])
  assert int(state.step) == 4
  assert losses_seen[-1] < losses_seen[0] - 0.5, losses_seen


# ---------------------------------------------------------------------------------------
# Rollout collection with a scripted sampler (no model)
# ---------------------------------------------------------------------------------------


class ScriptedOutput(NamedTuple):
  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  mask: np.ndarray


class DigitTokenizer:
  """Token t (< 10) decodes to the digit t; the response is `\\boxed{digits}`."""

  def batch_decode(self, rows, skip_special_tokens=True):
    del skip_special_tokens
    return ["\\boxed{" + "".join(str(t) for t in row) + "}" for row in rows]


def scripted_sampler(num_correct_by_answer):
  """Sample j of a prompt with answer a is right (token a) iff j < num_correct[a]."""

  def sample(model, input_ids, *, num_samples, max_new_tokens, **kwargs):
    del model
    answers = input_ids[:, -1]
    tokens = np.zeros((len(answers) * num_samples, max_new_tokens), np.int32)
    for p, answer in enumerate(answers):
      for j in range(num_samples):
        right = j < num_correct_by_answer[int(answer)]
        tokens[p * num_samples + j, 0] = answer if right else (answer + 1) % 10
    lengths = np.ones(len(tokens), np.int32)
    mask = np.zeros_like(tokens)
    mask[:, 0] = 1
    return ScriptedOutput(tokens, np.zeros(tokens.shape, np.float32), lengths, mask)

  return sample


def prompt_batches(answers_per_batch):
  for answers in answers_per_batch:
    ids = np.tile(np.arange(6, dtype=np.int32), (len(answers), 1))
    ids[:, -1] = answers  # the scripted sampler reads the answer here
    yield {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "pixel_values": np.zeros((0, 3), np.float32),
           "image_grid_thw": np.zeros((0, 3), np.int32),
           "num_images": np.zeros(len(answers), np.int32),
           "answer": [str(a) for a in answers], "id": [f"q{a}" for a in answers]}


def test_online_filtering_keeps_mixed_groups_and_samples_more_prompts():
  # Answers 0-3: all right, all wrong, half right, one of four right.
  num_correct = {0: 4, 1: 0, 2: 2, 3: 1}
  config = learner_lib.RolloutConfig(num_prompts=4, num_samples=4, max_new_tokens=2,
                                     reward_fn="accuracy", filter_groups=True,
                                     filter_low=0.01, filter_high=0.99, filter_max_tries=5)
  batches = prompt_batches([[0, 1, 2, 3], [0, 2, 1, 1], [3, 3, 0, 1]])
  groups, stats = learner_lib.collect_groups(None, batches, jax.random.PRNGKey(0), config,
                                             DigitTokenizer(),
                                             sample_fn=scripted_sampler(num_correct))
  assert [g.answer for g in groups] == ["2", "3", "2", "3"]
  assert all(0.01 <= g.accuracy <= 0.99 for g in groups)
  assert stats["filter_tries"] == 3 and stats["filter_fallback"] == 0
  assert stats["filter_kept_frac"] == pytest.approx(5 / 12)
  np.testing.assert_allclose(groups[0].advantages.sum(), 0.0, atol=1e-6)
  rollout = learner_lib.rollout_from_groups(groups)
  assert rollout.num_rows == 16 and rollout.images == [None] * 16


def test_online_filtering_gives_up_after_max_tries_and_fills_the_batch(caplog):
  num_correct = {0: 4, 1: 0, 2: 2, 3: 1}
  config = learner_lib.RolloutConfig(num_prompts=4, num_samples=4, max_new_tokens=2,
                                     reward_fn="accuracy", filter_groups=True,
                                     filter_max_tries=1)
  batches = prompt_batches([[0, 1, 2, 0], [2, 2, 2, 2]])
  with caplog.at_level(logging.WARNING):
    groups, stats = learner_lib.collect_groups(None, batches, jax.random.PRNGKey(0), config,
                                               DigitTokenizer(),
                                               sample_fn=scripted_sampler(num_correct))
  assert len(groups) == 4 and stats["filter_tries"] == 1 and stats["filter_fallback"] == 3
  assert "rl.filter_max_tries" in caplog.text
  # Without filtering every group is kept from the first batch.
  config = learner_lib.RolloutConfig(num_prompts=4, num_samples=4, max_new_tokens=2,
                                     reward_fn="accuracy")
  groups, stats = learner_lib.collect_groups(None, prompt_batches([[0, 1, 2, 3]]),
                                             jax.random.PRNGKey(0), config, DigitTokenizer(),
                                             sample_fn=scripted_sampler(num_correct))
  assert [g.accuracy for g in groups] == [1.0, 0.0, 0.5, 0.25]


# ---------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------


def test_schedules_warm_up_then_hold_or_decay():
  constant = train_state_lib.make_schedule({**OPTIM, "warmup_steps": 4}, 20)
  np.testing.assert_allclose([float(constant(i)) for i in (0, 3, 4, 19)],
                             [2.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  cosine = train_state_lib.make_schedule(
      {**OPTIM, "schedule": "cosine", "warmup_steps": 2, "final_lr_ratio": 0.1}, 12)
  np.testing.assert_allclose([float(cosine(i)) for i in (0, 1, 2, 7, 12)],
                             [5e-4, 1e-3, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
  with pytest.raises(ValueError, match="learning-rate schedule 'linear'"):
    train_state_lib.make_schedule({**OPTIM, "schedule": "linear"}, 10)


def test_teacher_forced_logprobs_match_the_samplers(model):
  # The old-policy log-probs the ratio starts from must be those the sampler drew with
  # (same positions, images and temperature), or the first update's ratio is not 1.
  # (This random model samples the image placeholder id in one row; the response ends
  # there.)
  from dprl.sampling import generate  # pylint: disable=g-import-not-at-top
  cfg = model.config
  prompts = make_rollout(cfg, rows=2, seed=5)
  pixel_values = np.concatenate([pv for pv, _ in prompts.images])
  grid = np.concatenate([g for _, g in prompts.images])
  out = generate(model, prompts.prompt_ids, attention_mask=prompts.prompt_mask,
                 pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=6,
                 temperature=0.8, seed=9, num_samples=2, eos_token_id=[7])
  tokens = np.asarray(out.tokens)
  assert (tokens == cfg.image_token_id).any()  # seed 9 draws it (the first seed that does)
  _, mask = learner_lib.end_at_vision_tokens(tokens, np.asarray(out.lengths),
                                             [cfg.image_token_id, cfg.video_token_id])
  assert mask.sum() < np.asarray(out.mask).sum()
  rollout = learner_lib.Rollout(
      np.repeat(prompts.prompt_ids, 2, axis=0), np.repeat(prompts.prompt_mask, 2, axis=0),
      tokens, mask, np.zeros(4, np.float32),
      [image for image in prompts.images for _ in range(2)])
  learner, state = make_learner(model, single_device_mesh(), optax.sgd(0.0),
                                micro_batch_size=4, temperature=0.8)
  logp, _ = learner.logprobs(state.params, rollout)
  valid = mask.astype(bool)
  np.testing.assert_allclose(logp[valid], np.asarray(out.logprobs)[valid], atol=1e-4)


def test_a_sampled_image_placeholder_does_not_shift_other_rows_images(model):
  # The model gives the k-th image placeholder of the batch the k-th image feature; a
  # placeholder in row 0's response must not take row 1's image.
  cfg = model.config
  rollout = make_rollout(cfg, rows=2, seed=6)
  alone = make_rollout(cfg, rows=2, seed=6)
  rollout.response_ids[0, 1] = cfg.image_token_id
  learner, state = make_learner(model, single_device_mesh(), optax.sgd(0.0),
                                micro_batch_size=2)
  with_placeholder, _ = learner.logprobs(state.params, rollout)
  without, _ = learner.logprobs(state.params, alone)
  valid = rollout.response_mask[1].astype(bool)
  np.testing.assert_allclose(with_placeholder[1][valid], without[1][valid], atol=1e-5)
  np.testing.assert_allclose(with_placeholder[0, 0], without[0, 0], atol=1e-5)
  lengths, mask = learner_lib.end_at_vision_tokens(
      np.array([[5, 290, 6], [5, 6, 7]]), np.array([3, 2]), [290])
  np.testing.assert_array_equal(lengths, [2, 2])
  np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 1, 0]])
