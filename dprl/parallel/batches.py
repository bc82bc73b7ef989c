"""Host-local batches in, global arrays out; and the few multi-host chores around them.

Each host's pipeline yields its own slice of the global batch (`dprl.data.pipeline` shards
records by `jax.process_index()`); `global_batch` stitches the slices into `jax.Array`s
sharded over the mesh without moving data between hosts. Host p's rows land on the mesh
positions of host p's devices, so with `make_mesh` or `make_hybrid_mesh` (data outermost)
the global batch is the hosts' batches concatenated in process order.

All hosts must pass arrays of equal shapes: pad to common lengths first (the pipeline's
length buckets make this cheap). `global_batch` checks this across hosts by default,
because a mismatch otherwise surfaces as a hang or as silently misplaced rows.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_MAX_RANK = 8
F = TypeVar("F", bound=Callable[..., Any])


def is_primary() -> bool:
  """Whether this is process 0, the one that writes logs, metrics and summaries."""
  return jax.process_index() == 0


def primary_only(fn: F) -> F:
  """Runs `fn` on process 0 only; elsewhere the call does nothing and returns None.

  For host-side side effects (metric writers, plots, printing). Never wrap anything that
  runs a JAX collective or writes a checkpoint: every process must take part in those.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    if is_primary():
      return fn(*args, **kwargs)
    return None

  return wrapper  # type: ignore[return-value]


def sync_global_devices(name: str) -> None:
  """Barrier: returns once every process has reached the call with this `name`.

  Free for a single process. Mismatched names across hosts are an error in JAX, which is
  why they should say what the barrier guards ("checkpoint_written_step_100").
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _is_array(value: Any) -> bool:
  return isinstance(value, (np.ndarray, np.generic, jax.Array))


def _spec_for(key: str, value: np.ndarray, spec: P | Mapping[str, P]) -> P:
  if isinstance(spec, Mapping):
    if key not in spec:
      raise KeyError(f"no PartitionSpec for batch key {key!r}; spec has {sorted(spec)}")
    spec = spec[key]
  # P("data") on a scalar (a per-batch count) means replicated: it has no batch axis.
  return P(*tuple(spec)[:value.ndim])


def _check_same_across_processes(arrays: Mapping[str, np.ndarray]) -> None:
  """Raises on every host if the hosts' keys, dtypes or shapes differ (two small all-gathers)."""
  keys = sorted(arrays)
  structure = zlib.crc32(repr([(k, str(arrays[k].dtype)) for k in keys]).encode())
  header = multihost_utils.process_allgather(np.array([len(keys), structure], np.int64))
  if np.any(header != header[0]):
    raise ValueError(
        f"global_batch: hosts disagree on the batch keys/dtypes (process {jax.process_index()} has "
        f"{[(k, str(arrays[k].dtype)) for k in keys]}); every host must pass the same keys")
  shapes = np.full((len(keys), _MAX_RANK), -1, np.int64)
  for i, k in enumerate(keys):
    if arrays[k].ndim > _MAX_RANK:
      raise ValueError(f"global_batch: {k!r} has rank {arrays[k].ndim} > {_MAX_RANK}")
    shapes[i, :arrays[k].ndim] = arrays[k].shape
  every = multihost_utils.process_allgather(shapes)  # [processes, keys, rank]
  for i, k in enumerate(keys):
    if np.any(every[:, i] != every[0, i]):
      per_host = {p: tuple(int(d) for d in every[p, i] if d >= 0) for p in range(every.shape[0])}
      raise ValueError(f"global_batch: {k!r} has different shapes on different hosts {per_host}; "
                       "pad every host's batch to the same shape first")


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh, spec: P | Mapping[str, P] = P("data"), *,
                 check_shapes: bool = True) -> dict[str, Any]:
  """This host's slice of a batch -> global `jax.Array`s sharded by `spec` over `mesh`.

  Args:
    local_batch: key -> array whose leading axis holds this host's rows (the global
      batch has process_count times as many along every sharded axis). Values that are
      not arrays (lists of ids, answers) stay as they are: host-local metadata.
    mesh: the global mesh.
    spec: one PartitionSpec for every array, or one per key. Axes beyond an array's rank
      are dropped, so scalars are replicated.
    check_shapes: with several processes, first verify (two tiny all-gathers) that all
      hosts pass equal keys, dtypes and shapes.
  """
  arrays = {k: np.asarray(v) for k, v in local_batch.items() if _is_array(v)}
  if check_shapes and jax.process_count() > 1:
    _check_same_across_processes(arrays)
  out = dict(local_batch)
  for key, value in arrays.items():
    sharding = NamedSharding(mesh, _spec_for(key, value, spec))
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def to_host(tree: Any) -> Any:
  """The full value of every (possibly sharded, multi-host) array of `tree` as NumPy, on every host.

  A collective when any array is not fully addressable here: call it on all processes.
  """

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)

  return jax.tree.map(one, tree)
