"""Orbax checkpoints of train states: round trips across meshes, retention, preemption.

Kill-and-resume equality of whole runs is in test_train_cli.py.
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest

from dprl.models import qwen2_5_vl
from dprl.parallel.mesh import make_mesh
from dprl.rl import checkpointing
from dprl.rl import train_state as train_state_lib

OPTIM = dict(learning_rate=1e-3, schedule="constant", warmup_steps=0, final_lr_ratio=0.0,
             weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def params():
  _, params, _ = train_state_lib.split_params(qwen2_5_vl.init("tiny", seed=5))
  return params


def _state(params, mesh, seed=0):
  optimizer, _ = train_state_lib.make_optimizer(OPTIM, 10)
  state = train_state_lib.create_train_state(params, optimizer, seed)
  # Non-zero moments, so a mix-up of mu, nu and params shows.
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5, state.opt_state))
  shardings = train_state_lib.train_state_shardings(state, optimizer, mesh)
  return train_state_lib.place(state, shardings), shardings


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_everything_into_another_mesh(params, tmp_path):
  state, _ = _state(params, make_mesh(2, 2, 2), seed=7)
  state = state.replace(step=state.step + 3)
  ref = jax.tree.map(lambda x: x * 2, state.params)
  with checkpointing.Checkpointer(str(tmp_path / "ckpt"), save_every=1) as checkpointer:
    assert checkpointer.save(3, state, ref_params=ref, data_state={"next_index": 12},
                             meta={"model_config": {"model_type": "qwen2_5_vl"}})
    checkpointer.wait()
    # Restore onto one device: arrays land in the target shardings, values unchanged.
    single = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    target, target_shardings = _state(params, single)
    restored = checkpointer.restore(_abstract(target, target_shardings),
                                    abstract_ref=_abstract(target.params,
                                                           target_shardings.params))
  assert restored.step == 3 and int(restored.state.step) == 3
  assert restored.data_state == {"next_index": 12}
  assert restored.meta == {"model_config": {"model_type": "qwen2_5_vl"}}
  _assert_trees_equal(restored.state, state)
  _assert_trees_equal(restored.ref_params, ref)
  for leaf in jax.tree.leaves(restored.state):
    assert leaf.sharding.mesh.devices.size == 1


def test_saves_on_the_interval_keeps_the_last_k_and_forces(params, tmp_path):
  state, shardings = _state(params, make_mesh(2, 2, 2))
  with checkpointing.Checkpointer(str(tmp_path), save_every=3, max_to_keep=2) as checkpointer:
    saved = [step for step in range(1, 8) if checkpointer.save(step, state)]
    assert saved == [3, 6]
    assert checkpointer.save(7, state, force=True)
    checkpointer.wait()
    assert checkpointer.all_steps() == [6, 7]
    assert checkpointer.latest_step() == 7
    restored = checkpointer.restore(_abstract(state, shardings))
    assert restored.step == 7 and restored.data_state is None and restored.ref_params is None


def test_restore_errors_name_the_checkpoint(params, tmp_path):
  state, shardings = _state(params, make_mesh(2, 2, 2))
  with checkpointing.Checkpointer(str(tmp_path / "empty")) as checkpointer:
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint to restore"):
      checkpointer.restore(_abstract(state, shardings))
  with checkpointing.Checkpointer(str(tmp_path / "c"), save_every=1) as checkpointer:
    checkpointer.save(1, state)
    checkpointer.wait()
    with pytest.raises(checkpointing.CheckpointError, match="no ref_params item"):
      checkpointer.restore(_abstract(state, shardings), abstract_ref=state.params)
  with pytest.raises(checkpointing.CheckpointError, match="lacks 1 expected arrays"):
    checkpointing.unflatten({"a": 0, "b": 1}, {"a": 0})


def test_find_checkpoint_and_load_params_from_an_earlier_run(params, tmp_path):
  state, shardings = _state(params, make_mesh(2, 2, 2))
  run = tmp_path / "run"
  with checkpointing.Checkpointer(str(run / "checkpoints"), save_every=1) as checkpointer:
    checkpointer.save(2, state, meta={"model_config": {"x": 1}})
    checkpointer.save(5, state, meta={"model_config": {"x": 1}})
  directory = str(run / "checkpoints")
  assert checkpointing.find_checkpoint(str(run)) == (directory, 5)
  assert checkpointing.find_checkpoint(directory) == (directory, 5)
  assert checkpointing.find_checkpoint(str(run / "checkpoints" / "2")) == (directory, 2)
  assert checkpointing.find_checkpoint(str(tmp_path)) is None
  assert checkpointing.read_meta(directory, 5) == {"model_config": {"x": 1}}
  loaded = checkpointing.load_params(directory, 5, _abstract(state.params, shardings.params))
  _assert_trees_equal(loaded, state.params)


def test_sigterm_becomes_a_flag_and_the_old_handler_comes_back():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionWatcher() as watcher:
    assert not watcher.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.requested and watcher.signal_received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == previous


def test_checkpointer_options_are_checked(tmp_path):
  with pytest.raises(ValueError, match="checkpoint.every"):
    checkpointing.Checkpointer(str(tmp_path), save_every=0)
  with pytest.raises(ValueError, match="checkpoint.max_to_keep"):
    checkpointing.Checkpointer(str(tmp_path), max_to_keep=0)
