"""Orbax checkpoints of a training run, and saving on preemption (SIGTERM).

    checkpointer = Checkpointer(workdir + "/checkpoints", save_every=100, max_to_keep=3)
    checkpointer.save(step, state, ref_params=ref, data_state=iterator.get_state(),
                      meta={"model_config": ...})          # asynchronous, every N steps
    restored = checkpointer.restore(abstract_state, abstract_ref=abstract_ref)
    restored.state, restored.ref_params, restored.data_state, restored.meta

A checkpoint (`<dir>/<step>/`) has the items
  params      the trainable parameters (also what `load_params` reads to start a new run
              from an earlier one);
  train       optimizer state, step and PRNG key;
  ref_params  the frozen reference, when the run has one (beta > 0), since it may have
              been synced from the policy and is then not the initial checkpoint;
  data        the grain iterator's `get_state()` (JSON), so a resumed run reads the same
              prompts an uninterrupted one would;
  meta        JSON: the model's config.json dict (`model_config`) and anything else.
Trees are stored as flat dicts keyed by their dotted key paths and rebuilt from the
abstract state the caller passes (ShapeDtypeStructs with shardings), so arrays are
restored straight into their shardings on the current mesh.

Preemption: `PreemptionWatcher` turns SIGTERM into a flag the training loop polls after
each step; the loop then saves (force) and waits for the write before exiting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import threading
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dprl.parallel.batches import every_process


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message names its folder."""


def key_str(key_path) -> str:
  """"opt_state.1.0.mu.model.embed_tokens.embedding" for a pytree key path."""
  parts = []
  for key in key_path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts) or "value"


def flatten(tree) -> dict[str, Any]:
  """{dotted key path: leaf} of a pytree (nnx.State, optax states, dataclasses)."""
  flat = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = key_str(key_path)
    if key in flat:
      raise ValueError(f"two leaves share the checkpoint key {key!r}")
    flat[key] = leaf
  return flat


def unflatten(like, flat: dict[str, Any]):
  """The tree of structure `like` with leaves from `flat` (keys as `flatten` makes)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  keys = [key_str(p) for p, _ in paths]
  missing = [k for k in keys if k not in flat]
  if missing:
    raise CheckpointError(f"checkpoint lacks {len(missing)} expected arrays, e.g. "
                          f"{missing[:3]}; it was written for a different model or optimizer")
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


def _abstract(tree):
  """ShapeDtypeStructs (with shardings where the leaves have them) of a tree."""
  def one(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


def _train_part(state) -> dict[str, Any]:
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  ref_params: Any | None
  data_state: dict | None
  meta: dict


def _check_one_data_state(data_state: dict) -> None:
  """With several processes, that every host's data-iterator state is the same.

  Orbax writes JSON items from process 0 only, and every host resumes from that one
  state: right when the hosts read their shards in lockstep ({"next_index": k} each),
  silently wrong otherwise.
  """
  if jax.process_count() == 1:
    return
  digest = zlib.crc32(json.dumps(data_state, sort_keys=True, default=str).encode())
  if len(set(every_process(np.uint32(digest)).tolist())) > 1:
    raise CheckpointError(f"the hosts' data-iterator states differ (process {jax.process_index()} has "
                          f"{data_state}); a checkpoint can hold only one")


class Checkpointer:
  """An Orbax CheckpointManager for train states.

  Args:
    directory: where step folders go (created).
    save_every: `save` writes when step % save_every == 0 (or when forced).
    max_to_keep: the last K checkpoints are kept (None: all).
    async_save: write in a background thread; `wait()` blocks until written.
  """

  def __init__(self, directory: str, *, save_every: int = 100, max_to_keep: int | None = 3,
               async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"checkpoint.every must be >= 1, got {save_every}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"checkpoint.max_to_keep must be >= 1 (or None), got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    # The interval is applied in `save` (Orbax's own policy also saves the first step it
    # sees, which would make a resumed run's checkpoints depend on where it resumed).
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, ref_params=None, data_state: dict | None = None,
           meta: dict | None = None, force: bool = False) -> bool:
    """Saves if step is on the interval (or `force`); returns whether it saved.

    A step that is already saved is not saved again.
    """
    if (not force and step % self.save_every) or step in self._manager.all_steps():
      return False
    items = {
        "params": ocp.args.StandardSave(flatten(state.params)),
        "train": ocp.args.StandardSave(flatten(_train_part(state))),
        "meta": ocp.args.JsonSave(dict(meta or {})),
    }
    if ref_params is not None:
      items["ref_params"] = ocp.args.StandardSave(flatten(ref_params))
    if data_state is not None:
      _check_one_data_state(data_state)
      items["data"] = ocp.args.JsonSave(data_state)
    saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    if saved:
      log.info("saving checkpoint of step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state, *, step: int | None = None, abstract_ref=None,
              with_data: bool = True) -> Restored:
    """Restores `step` (default: the latest) into the shardings of `abstract_state`.

    Args:
      abstract_state: a TrainState of ShapeDtypeStructs (with shardings) or arrays.
      step: which checkpoint; None for the latest.
      abstract_ref: the reference params' abstract tree, if the run has one.
      with_data: also restore the data iterator state.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{self.directory}: no checkpoint to restore")
    names = set(self._item_names(step))
    if abstract_ref is not None and "ref_params" not in names:
      raise CheckpointError(f"{self.directory}/{step}: no ref_params item, but the run has "
                            "a reference model (rl.beta > 0)")
    items = {
        "params": ocp.args.StandardRestore(_abstract(flatten(abstract_state.params))),
        "train": ocp.args.StandardRestore(_abstract(flatten(_train_part(abstract_state)))),
        "meta": ocp.args.JsonRestore(),
    }
    if abstract_ref is not None:
      items["ref_params"] = ocp.args.StandardRestore(_abstract(flatten(abstract_ref)))
    if with_data and "data" in names:
      items["data"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{self.directory}/{step}: cannot restore: {e}") from e
    params = unflatten(abstract_state.params, restored["params"])
    train = unflatten(_train_part(abstract_state), restored["train"])
    state = abstract_state.replace(params=params, **train)
    ref = None if abstract_ref is None else unflatten(abstract_ref, restored["ref_params"])
    data = restored["data"] if "data" in items else None
    return Restored(step=step, state=state, ref_params=ref, data_state=data,
                    meta=dict(restored["meta"] or {}))

  def _item_names(self, step: int) -> list[str]:
    step_dir = os.path.join(self.directory, str(step))
    if not os.path.isdir(step_dir):
      raise CheckpointError(f"{step_dir}: no such checkpoint")
    return [name for name in os.listdir(step_dir) if not name.startswith(("_", "."))]

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------------------
# Starting a new run from an earlier run's checkpoint
# ---------------------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^\d+$")


def find_checkpoint(path: str) -> tuple[str, int] | None:
  """(manager directory, step) for a run folder, its checkpoints folder or a step folder;
  None if `path` holds no Orbax checkpoint."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    return None
  name = os.path.basename(path)
  if _STEP_DIR.match(name) and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(name)
  for candidate in (path, os.path.join(path, "checkpoints")):
    if not os.path.isdir(candidate):
      continue
    steps = [int(n) for n in os.listdir(candidate)
             if _STEP_DIR.match(n) and os.path.isdir(os.path.join(candidate, n, "params"))]
    if steps:
      return candidate, max(steps)
  return None


def read_meta(directory: str, step: int) -> dict:
  """The `meta` JSON of a checkpoint (e.g. its `model_config`)."""
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    return dict(manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"] or {})
  finally:
    manager.close()


def load_params(directory: str, step: int, abstract_params):
  """The `params` item of a checkpoint, restored into `abstract_params`' shardings."""
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(flatten(abstract_params)))))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{directory}/{step}: cannot restore params: {e}") from e
  finally:
    manager.close()
  return unflatten(abstract_params, restored["params"])


# ---------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------


class PreemptionWatcher:
  """Turns SIGTERM (what schedulers send before preempting) into a flag.

  The handler only sets the flag; the training loop checks `requested` after each step,
  saves and exits. Installed only from the main thread (Python's rule for signal
  handlers); elsewhere it is inert. `close()` restores the previous handler.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.requested = False
    self.signal_received: int | None = None
    self._previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
      log.warning("not in the main thread: SIGTERM will not trigger a checkpoint")
      return
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    self.requested = True
    self.signal_received = signum
    log.warning("received signal %d: will checkpoint after the current step and exit",
                signum)

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def __enter__(self) -> PreemptionWatcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
