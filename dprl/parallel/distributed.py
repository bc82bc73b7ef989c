"""Multi-host initialisation: one call at the start of every entry point.

    from dprl.parallel import distributed
    detected = distributed.initialize()   # before any other JAX call
    logging.info("%s", detected.summary())

Where the process group comes from, first match wins:
  explicit   arguments, else the environment variables JAX_COORDINATOR_ADDRESS,
             JAX_NUM_PROCESSES, JAX_PROCESS_ID (and JAX_LOCAL_DEVICE_IDS);
  slurm      SLURM_PROCID / SLURM_NTASKS of an `srun` step; the first host of
             SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST) is the coordinator;
  tpu        a Cloud TPU pod (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with more than
             one worker, MEGASCALE_NUM_SLICES > 1, or the TPU VM metadata server listing
             several workers): JAX detects everything itself;
  single     anything else, or a group of one process: nothing to initialise.
Explicit values given alongside slurm or tpu override what those detect.

`detect()` only reads the environment, so tests and `--dry_run`-style logging can call it
without starting anything.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import urllib.request
from typing import Mapping, Sequence

import jax

log = logging.getLogger(__name__)

EXPLICIT_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}
# jax's own SLURM detection uses the same rule, so a job mixing dprl and plain-JAX steps
# agrees on the port; JAX_COORDINATOR_PORT overrides it.
_SLURM_PORT_BASE = 65535 - 2**12 + 1
_TPU_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
_GOOGLE_PCI_VENDOR = "0x1ae0"


class DistributedConfigError(ValueError):
  """The process-group settings are missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Detected:
  """What `detect` found: the `jax.distributed.initialize` arguments and where they came from.

  For `kind == "tpu"` the fields are only what was given explicitly; JAX fills in the rest.
  """
  kind: str  # "explicit" | "slurm" | "tpu" | "single"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  source: str = ""  # the variables or arguments that decided it, for logs

  @property
  def is_multiprocess(self) -> bool:
    return self.kind != "single"

  def summary(self) -> str:
    if self.kind == "single":
      return f"single process ({self.source})"
    parts = [f"{self.kind}:"]
    if self.process_id is not None and self.num_processes is not None:
      parts.append(f"process {self.process_id} of {self.num_processes},")
    elif self.num_processes is not None:
      parts.append(f"{self.num_processes} processes,")
    parts.append(f"coordinator {self.coordinator_address or '(detected by JAX)'},")
    devices = "all visible" if self.local_device_ids is None else list(self.local_device_ids)
    parts.append(f"local devices {devices} ({self.source})")
    return " ".join(parts)


def _int(value: str | int | None, name: str) -> int | None:
  if value is None or isinstance(value, int):
    return value
  try:
    return int(value)
  except ValueError:
    raise DistributedConfigError(f"{name}={value!r} is not an integer") from None


def _int_list(value: str | int | Sequence[int] | None, name: str) -> tuple[int, ...] | None:
  if value is None:
    return None
  if isinstance(value, int):
    return (value,)
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  return tuple(_int(v, name) for v in value)


def first_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist: 'gpu[003-004,010]-ib,cpu1' -> 'gpu003-ib'.

  Takes the first top-level entry (commas inside brackets do not separate hosts) and,
  in each bracket group, the first number as written (zero padding kept).
  """
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):
    depth += ch == "["
    depth -= ch == "]"
    if ch == "," and depth == 0:
      end = i
      break
  entry = nodelist[:end].strip()
  host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry)
  if not host or "[" in host or "]" in host:
    raise DistributedConfigError(f"cannot read the first host of SLURM node list {nodelist!r}")
  return host


def _tasks_per_node(spec: str) -> list[int]:
  """SLURM's compressed per-node task counts: '4(x2),3' -> [4, 4, 3]."""
  counts = []
  for part in spec.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if not m:
      raise DistributedConfigError(f"cannot read SLURM tasks per node {spec!r}")
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  return counts


def _local_task_count(env: Mapping[str, str]) -> int | None:
  node = _int(env.get("SLURM_NODEID", "0"), "SLURM_NODEID")
  for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if env.get(var):
      counts = _tasks_per_node(env[var])
      return counts[node] if node < len(counts) else counts[-1]
  if env.get("SLURM_NTASKS_PER_NODE"):
    return _int(env["SLURM_NTASKS_PER_NODE"], "SLURM_NTASKS_PER_NODE")
  return None


def _detect_slurm(env: Mapping[str, str]) -> Detected | None:
  if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
    return None  # not inside an srun step (an salloc shell sets no SLURM_PROCID)
  num_processes = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
  process_id = _int(env["SLURM_PROCID"], "SLURM_PROCID")
  if num_processes == 1:
    return Detected("single", source="SLURM_NTASKS=1")
  nodelist_var = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
  if not env.get(nodelist_var):
    raise DistributedConfigError(
        "SLURM_PROCID and SLURM_NTASKS are set but neither SLURM_STEP_NODELIST nor "
        "SLURM_JOB_NODELIST is; set JAX_COORDINATOR_ADDRESS=host:port")
  port = env.get("JAX_COORDINATOR_PORT")
  if port is None:
    if not env.get("SLURM_JOB_ID"):
      raise DistributedConfigError("SLURM_JOB_ID is not set; set JAX_COORDINATOR_PORT to choose the port")
    port = _SLURM_PORT_BASE + _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 2**12
  coordinator = f"{first_host(env[nodelist_var])}:{port}"
  # One process per GPU (several tasks on this node): each takes the GPU of its local
  # rank, unless SLURM already narrowed CUDA_VISIBLE_DEVICES to one GPU (--gpus-per-task,
  # --gpu-bind), whose CUDA ordinal is then 0. One process per node: all visible GPUs.
  # (jax's own SLURM detection always takes [SLURM_LOCALID], wrong for one per node.)
  local_ids = None
  local_tasks = _local_task_count(env)
  if local_tasks is None and env.get("SLURM_NNODES"):
    nodes = _int(env["SLURM_NNODES"], "SLURM_NNODES")
    local_tasks = -(-num_processes // nodes)
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if (local_tasks or 1) > 1 and len(visible) != 1 and "SLURM_LOCALID" in env:
    local_ids = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)
  return Detected("slurm", coordinator, num_processes, process_id, local_ids,
                  source=f"SLURM_PROCID, SLURM_NTASKS, {nodelist_var}")


def _has_tpu_chips() -> bool:
  """Whether a Google TPU is on the PCI bus (what jax itself checks), without starting JAX."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _tpu_metadata(key: str) -> str | None:
  """A TPU VM metadata attribute, or None off GCE (short timeout: it is on the start path)."""
  request = urllib.request.Request(_TPU_METADATA_URL + key, headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=2) as response:
      return response.read().decode()
  except OSError:
    return None


def _detect_tpu(env: Mapping[str, str]) -> Detected | None:
  slices = _int(env.get("MEGASCALE_NUM_SLICES", "1"), "MEGASCALE_NUM_SLICES")
  for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if env.get(var):
      workers = len([w for w in env[var].split(",") if w.strip()])
      if workers * slices > 1:
        return Detected("tpu", source=f"{var} lists {workers} workers, {slices} slice(s)")
      return Detected("single", source=f"{var} lists one TPU worker")
  if slices > 1:
    return Detected("tpu", source=f"MEGASCALE_NUM_SLICES={slices}")
  if not _has_tpu_chips():
    return None
  endpoints = _tpu_metadata("worker-network-endpoints")
  if endpoints is None:
    log.warning("TPU chips found but the TPU VM metadata server did not answer; running as a "
                "single process (set JAX_COORDINATOR_ADDRESS etc. if this is a pod)")
    return Detected("single", source="TPU host, no metadata")
  workers = len([w for w in endpoints.split(",") if w.strip()])
  if workers > 1:
    return Detected("tpu", source=f"TPU VM metadata lists {workers} workers")
  return Detected("single", source="TPU VM metadata lists one worker")


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
           env: Mapping[str, str] | None = None) -> Detected:
  """The process group this process belongs to; reads the environment, starts nothing."""
  env = os.environ if env is None else env
  explicit = {
      "coordinator_address": coordinator_address or env.get(EXPLICIT_ENV["coordinator_address"]) or None,
      "num_processes": _int(num_processes if num_processes is not None
                            else env.get(EXPLICIT_ENV["num_processes"]), EXPLICIT_ENV["num_processes"]),
      "process_id": _int(process_id if process_id is not None
                         else env.get(EXPLICIT_ENV["process_id"]), EXPLICIT_ENV["process_id"]),
      "local_device_ids": _int_list(local_device_ids if local_device_ids is not None
                                    else env.get(EXPLICIT_ENV["local_device_ids"]),
                                    EXPLICIT_ENV["local_device_ids"]),
  }
  given = {k: v for k, v in explicit.items() if v is not None}
  group_keys = ("coordinator_address", "num_processes", "process_id")
  if explicit["num_processes"] == 1:
    return Detected("single", source=f"num_processes=1 ({EXPLICIT_ENV['num_processes']} or argument)")

  if all(explicit[k] is not None for k in group_keys):
    found = Detected("explicit", **explicit, source="arguments / JAX_* variables")
  else:
    found = _detect_slurm(env) or _detect_tpu(env)
    if found is None or found.kind == "single":
      partial = [k for k in group_keys if k in given]
      if partial:
        missing = [f"{k} (or {EXPLICIT_ENV[k]})" for k in group_keys if k not in given]
        raise DistributedConfigError(
            f"multi-process run asked for by {', '.join(partial)} but no SLURM or TPU pod "
            f"environment fills in the rest: also give {', '.join(missing)}")
      return found or Detected("single", source="no SLURM, TPU pod or JAX_COORDINATOR_ADDRESS")
    if given:
      found = dataclasses.replace(found, **given, source=found.source + " + explicit " + ", ".join(given))

  if found.num_processes is not None and found.process_id is not None:
    if not 0 <= found.process_id < found.num_processes:
      raise DistributedConfigError(
          f"process_id {found.process_id} not in [0, num_processes={found.num_processes}) "
          f"(from {found.source})")
  if found.coordinator_address is not None and ":" not in found.coordinator_address:
    raise DistributedConfigError(
        f"coordinator address {found.coordinator_address!r} has no port; give host:port "
        f"({EXPLICIT_ENV['coordinator_address']} or coordinator_address=)")
  return found


_initialized: Detected | None = None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               **jax_kwargs) -> Detected:
  """Joins the process group `detect` finds (no-op for a single process); idempotent.

  Must run before any other JAX call that starts a backend (jax.devices(), a jit, ...).
  `jax_kwargs` go to `jax.distributed.initialize` (e.g. initialization_timeout).
  Returns what was detected; its `summary()` is logged here.
  """
  global _initialized
  if jax.distributed.is_initialized():
    if _initialized is None or not _initialized.is_multiprocess:
      _initialized = Detected("explicit", num_processes=jax.process_count(), process_id=jax.process_index(),
                              source="jax.distributed initialised outside dprl")
    return _initialized
  if _initialized is not None:
    return _initialized
  found = detect(coordinator_address, num_processes, process_id, local_device_ids)
  if not found.is_multiprocess:
    log.info("dprl.parallel.distributed: %s", found.summary())
    _initialized = found
    return found
  log.info("dprl.parallel.distributed: initialising %s", found.summary())
  kwargs = dict(coordinator_address=found.coordinator_address, num_processes=found.num_processes,
                process_id=found.process_id,
                local_device_ids=None if found.local_device_ids is None else list(found.local_device_ids))
  if found.kind != "tpu":
    # Everything is decided: stop JAX's own cluster detection from replacing an unset
    # local_device_ids with [SLURM_LOCALID] (wrong for one process per node).
    kwargs["cluster_detection_method"] = "deactivate"
  try:
    jax.distributed.initialize(**kwargs, **jax_kwargs)
  except RuntimeError as e:
    raise RuntimeError(f"jax.distributed.initialize failed for {found.summary()}: {e}. "
                       "dprl.parallel.distributed.initialize() must be the first JAX call of the "
                       "program.") from e
  _initialized = found
  return found


def detected() -> Detected | None:
  """What `initialize` found (None before it runs), for logs and run metadata."""
  return _initialized
