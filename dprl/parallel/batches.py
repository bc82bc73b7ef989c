"""Host-local batches in, global arrays out; and the few multi-host chores around them.

Each host's pipeline yields its own slice of the global batch (`dprl.data.pipeline` shards
records by `jax.process_index()`); `global_batch` stitches the slices into `jax.Array`s
sharded over the mesh without moving data between hosts. Host p's rows land on the mesh
positions of host p's devices, so with `make_mesh` or `make_hybrid_mesh` (data outermost)
the global batch is the hosts' batches concatenated in process order.

All hosts must pass arrays of equal shapes: pad to common lengths first (the pipeline's
length buckets make this cheap). `global_batch` checks this across hosts by default,
because a mismatch otherwise surfaces as a hang or as silently misplaced rows.

The way back: `process_local` is this host's block of a global array (the inverse of
`global_batch`), `process_rows` the rows a sharding gives this host. Small host values
that every host must agree on (a padded width, a "stop now" flag, rollout statistics) go
through `every_process` and `concat_across_processes`. With one process all of these
return their input unchanged, without a collective.
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


def every_process(value: Any) -> np.ndarray:
  """`value` (a host scalar or array, the same shape everywhere) from every process:
  [process_count, *shape], in process order. A collective: call it on all processes."""
  value = np.asarray(value)
  if jax.process_count() == 1:
    return value[None]
  return np.asarray(multihost_utils.process_allgather(value))


def concat_across_processes(local: np.ndarray, position: int | None = None) -> np.ndarray:
  """Every process's `local` concatenated along axis 0, the same result on every process.

  Args:
    local: [n_p, ...]; n_p may differ between processes, the other dimensions may not.
    position: where this process's part goes (ascending); default its process index.
      Pass the start of its rows in a sharded batch so that the parts follow the rows.

  Returns:
    [sum_p n_p, ...]. A collective (two all-gathers) with several processes.
  """
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  position = jax.process_index() if position is None else position
  header = every_process(np.array([local.shape[0], position], np.int64))  # [P, 2]
  longest = int(header[:, 0].max())
  padded = np.zeros((longest,) + local.shape[1:], local.dtype)
  padded[:local.shape[0]] = local
  parts = every_process(padded)  # [P, longest, ...]
  order = np.argsort(header[:, 1], kind="stable")
  return np.concatenate([parts[p, :int(header[p, 0])] for p in order])


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> slice:
  """The rows of a [num_rows, ...] array placed with `sharding` that this process holds.

  Raises if they are not one contiguous block (`global_batch` could not place them).
  """
  spans = sorted({index[0].indices(num_rows)[:2]
                  for index in sharding.addressable_devices_indices_map((num_rows,)).values()})
  start, stop = spans[0][0], max(end for _, end in spans)
  covered = start
  for span_start, span_stop in spans:
    if span_start > covered:
      raise ValueError(f"this process's rows of a {num_rows}-row batch are not contiguous: {spans}")
    covered = max(covered, span_stop)
  return slice(start, stop)


def process_local(x: Any) -> np.ndarray:
  """This process's block of a global array, as NumPy (the inverse of `global_batch`).

  A fully addressable array (one process) comes back whole. Otherwise the block spans
  the indices its addressable shards cover, in every dimension; a replicated dimension
  comes back whole. No communication.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  bounds = [(dim, 0) for dim in x.shape]  # (lowest start, highest stop) per dim
  shards = []
  for shard in x.addressable_shards:
    spans = [index.indices(dim)[:2] for index, dim in zip(shard.index, x.shape)]
    bounds = [(min(lo, a), max(hi, b)) for (lo, hi), (a, b) in zip(bounds, spans)]
    shards.append((spans, shard.data))
  out = np.empty([hi - lo for lo, hi in bounds], x.dtype)
  for spans, data in shards:
    out[tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(spans, bounds))] = np.asarray(data)
  return out


def process_share(total: int, field: str) -> int:
  """This process's equal share of `total` (rows, prompts); an error naming `field` if
  the processes cannot split it evenly."""
  count = jax.process_count()
  if total % count:
    raise ValueError(f"{field} = {total} must be a multiple of the {count} processes "
                     "(every host takes an equal share)")
  return total // count
