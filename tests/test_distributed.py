"""Multi-host support: process-group detection, hybrid meshes, global batches, and two real
CPU processes whose sharded forward and Orbax checkpoint match one process."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from dprl import cli
from dprl import metrics as metrics_lib
from dprl import train as train_lib
from dprl.models.config import from_hf_dict
from dprl.models.sharding import state_shardings
from dprl.parallel import batches, distributed
from dprl.parallel.distributed import DistributedConfigError, detect, first_host
from dprl.parallel.mesh import make_hybrid_mesh, make_mesh
from dprl.rl import checkpointing
from dprl.rl import train_state as train_state_lib

import multihost_worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CLUSTER_PREFIXES = ("SLURM_", "TPU_", "MEGASCALE_", "CLOUD_TPU_")
_CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def clean_env(monkeypatch):
  """No cluster variables, no TPU chips, no metadata server: a laptop, whatever runs the tests."""
  for name in list(os.environ):
    if name.startswith(_CLUSTER_PREFIXES) or name in _CLUSTER_VARS:
      monkeypatch.delenv(name)
  monkeypatch.setattr(distributed, "_has_tpu_chips", lambda: False)
  monkeypatch.setattr(distributed, "_tpu_metadata", lambda key: None)
  monkeypatch.setattr(distributed, "_initialized", None)
  return monkeypatch


def _slurm(monkeypatch, **overrides):
  env = dict(SLURM_JOB_ID="4242", SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1",
             SLURM_NODEID="1", SLURM_STEP_NODELIST="gpu[003-004]", SLURM_JOB_NODELIST="gpu[001-009]",
             SLURM_STEP_TASKS_PER_NODE="4(x2)")
  env.update(overrides)
  for name, value in env.items():
    if value is None:
      monkeypatch.delenv(name, raising=False)
    else:
      monkeypatch.setenv(name, value)


# --- detection -------------------------------------------------------------------------


def test_no_cluster_environment_is_a_single_process(clean_env):
  found = detect()
  assert found.kind == "single" and not found.is_multiprocess
  assert "single process" in found.summary()


def test_explicit_arguments_win(clean_env):
  _slurm(clean_env)
  found = detect("10.0.0.1:1234", 2, 1, [0, 1])
  assert (found.kind, found.coordinator_address, found.num_processes, found.process_id,
          found.local_device_ids) == ("explicit", "10.0.0.1:1234", 2, 1, (0, 1))


def test_explicit_environment_variables(clean_env):
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "head:9999")
  clean_env.setenv("JAX_NUM_PROCESSES", "4")
  clean_env.setenv("JAX_PROCESS_ID", "3")
  clean_env.setenv("JAX_LOCAL_DEVICE_IDS", "2,3")
  found = detect()
  assert (found.kind, found.coordinator_address, found.num_processes, found.process_id,
          found.local_device_ids) == ("explicit", "head:9999", 4, 3, (2, 3))
  assert "process 3 of 4" in found.summary() and "head:9999" in found.summary()


def test_partial_explicit_settings_name_what_is_missing(clean_env):
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "head:9999")
  with pytest.raises(DistributedConfigError, match="num_processes \\(or JAX_NUM_PROCESSES\\).*JAX_PROCESS_ID"):
    detect()


def test_malformed_variable_is_named(clean_env):
  _slurm(clean_env, SLURM_PROCID="five")
  with pytest.raises(DistributedConfigError, match="SLURM_PROCID='five'"):
    detect()


def test_process_id_out_of_range_is_an_error(clean_env):
  with pytest.raises(DistributedConfigError, match="process_id 2 not in"):
    detect("head:1", 2, 2)


def test_coordinator_without_port_is_an_error(clean_env):
  with pytest.raises(DistributedConfigError, match="JAX_COORDINATOR_ADDRESS"):
    detect("head", 2, 0)


def test_num_processes_one_is_a_single_process(clean_env):
  assert detect(num_processes=1).kind == "single"


def test_slurm_one_process_per_gpu_takes_the_gpu_of_its_local_rank(clean_env):
  _slurm(clean_env)
  found = detect()
  assert found.kind == "slurm"
  assert (found.num_processes, found.process_id, found.local_device_ids) == (8, 5, (1,))
  # The step's node list, not the job's; jax's port rule so plain-JAX steps agree.
  assert found.coordinator_address == f"gpu003:{65535 - 4096 + 1 + 4242 % 4096}"


def test_slurm_one_process_per_node_sees_all_gpus(clean_env):
  _slurm(clean_env, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="1(x2)")
  found = detect()
  assert found.kind == "slurm" and found.local_device_ids is None


def test_slurm_gpu_binding_to_one_visible_gpu_needs_no_device_ids(clean_env):
  _slurm(clean_env, CUDA_VISIBLE_DEVICES="1")  # srun --gpus-per-task=1
  assert detect().local_device_ids is None


def test_slurm_falls_back_to_job_node_list_and_port_override(clean_env):
  _slurm(clean_env, SLURM_STEP_NODELIST=None, JAX_COORDINATOR_PORT="7777")
  assert detect().coordinator_address == "gpu001:7777"


def test_slurm_without_tasks_per_node_uses_node_count(clean_env):
  _slurm(clean_env, SLURM_STEP_TASKS_PER_NODE=None, SLURM_NNODES="8")
  assert detect().local_device_ids is None
  clean_env.setenv("SLURM_NNODES", "2")
  assert detect().local_device_ids == (1,)


def test_slurm_single_task_is_a_single_process(clean_env):
  _slurm(clean_env, SLURM_NTASKS="1", SLURM_PROCID="0")
  assert detect().kind == "single"


def test_salloc_shell_without_srun_is_a_single_process(clean_env):
  _slurm(clean_env, SLURM_PROCID=None)
  assert detect().kind == "single"


def test_explicit_values_override_slurm_fields(clean_env):
  _slurm(clean_env)
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "login1:5000")
  found = detect()
  assert (found.kind, found.coordinator_address, found.process_id) == ("slurm", "login1:5000", 5)
  assert "explicit coordinator_address" in found.source


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"),
    ("node001,host2", "node001"),
    ("node[001-015],host2", "node001"),
    ("node[007,001-003]", "node007"),
    ("rack[2-3]-gpu[10-11]", "rack2-gpu10"),
    ("gpu[003-004,010]-ib,cpu1", "gpu003-ib"),
])
def test_first_host_of_slurm_node_lists(nodelist, host):
  assert first_host(nodelist) == host


def test_unreadable_node_list_is_an_error():
  with pytest.raises(DistributedConfigError, match="node list"):
    first_host("node[001")


def test_tpu_pod_from_worker_hostnames_lets_jax_detect(clean_env):
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3")
  found = detect()
  assert found.kind == "tpu" and found.coordinator_address is None and found.num_processes is None
  assert "4 workers" in found.summary()


def test_single_host_tpu_is_a_single_process(clean_env):
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert detect().kind == "single"


def test_multislice_tpu_is_a_pod(clean_env):
  clean_env.setenv("MEGASCALE_NUM_SLICES", "2")
  assert detect().kind == "tpu"


def test_tpu_vm_metadata_lists_the_workers(clean_env):
  clean_env.setattr(distributed, "_has_tpu_chips", lambda: True)
  clean_env.setattr(distributed, "_tpu_metadata",
                    lambda key: "a:8470:10.0.0.2,b:8470:10.0.0.3" if key == "worker-network-endpoints" else None)
  assert detect().kind == "tpu"
  clean_env.setattr(distributed, "_tpu_metadata", lambda key: "a:8470:10.0.0.2")
  assert detect().kind == "single"


def test_initialize_single_process_is_a_no_op_and_idempotent(clean_env):
  found = distributed.initialize()
  assert found.kind == "single" and not jax.distributed.is_initialized()
  assert distributed.initialize() is found and distributed.detected() is found


# --- meshes ----------------------------------------------------------------------------


def test_hybrid_mesh_with_one_slice_is_make_mesh():
  mesh = make_hybrid_mesh(ici=(2, -1, 2), dcn=(1, 1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.devices.tolist() == make_mesh(2, 2, 2).devices.tolist()


def test_hybrid_mesh_across_slices_without_slices_is_a_clear_error():
  with pytest.raises(ValueError, match="no slice_index.*granule='process'"):
    make_hybrid_mesh(ici=(1, 4, 1), dcn=(2, 1, 1))


def test_hybrid_mesh_across_processes_needs_that_many_processes():
  with pytest.raises(ValueError, match=r"needs 2 granules \(granule='process'\), found 1"):
    make_hybrid_mesh(ici=(1, 4, 1), dcn=(2, 1, 1), granule="process")


# --- batches ---------------------------------------------------------------------------


def test_global_batch_shards_arrays_and_keeps_metadata():
  mesh = make_mesh(data=4, fsdp=2)
  local = {"input_ids": np.arange(16, dtype=np.int32).reshape(8, 2), "count": np.int32(3),
           "pixel_values": np.ones((8, 5), np.float32), "id": [f"r{i}" for i in range(8)]}
  batch = batches.global_batch(local, mesh, {"input_ids": P("data"), "count": P("data"),
                                             "pixel_values": P(("data", "fsdp"))})
  assert batch["input_ids"].sharding.spec == P("data")
  assert batch["input_ids"].addressable_shards[0].data.shape == (2, 2)
  assert batch["pixel_values"].addressable_shards[0].data.shape == (1, 5)
  assert batch["count"].sharding.spec == P() and int(batch["count"]) == 3
  assert batch["id"] is local["id"]
  np.testing.assert_array_equal(batches.to_host(batch["input_ids"]), local["input_ids"])


def test_global_batch_names_a_key_without_spec():
  with pytest.raises(KeyError, match="pixel_values"):
    batches.global_batch({"pixel_values": np.ones((8, 1))}, make_mesh(), {"input_ids": P("data")})


def test_primary_only_runs_on_process_zero_and_barrier_is_free():
  calls = []
  log_metrics = batches.primary_only(lambda step: calls.append(step) or step)
  assert batches.is_primary() and log_metrics(7) == 7 and calls == [7]
  batches.sync_global_devices("test_barrier")


# --- launch scripts --------------------------------------------------------------------


@pytest.mark.parametrize("script", ["launch/tpu_vm.sh", "launch/slurm_gpu.sbatch"])
def test_launch_script_parses(script):
  path = os.path.join(REPO, script)
  result = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_tpu_script_usage_lists_subcommands():
  result = subprocess.run(["bash", os.path.join(REPO, "launch/tpu_vm.sh")], capture_output=True, text=True,
                          env={**os.environ, "PATH": os.environ.get("PATH", "")})
  assert result.returncode != 0
  for command in ("create", "setup", "run", "logs", "delete"):
    assert command in result.stderr


def _tpu_script(tmp_path, *args, **env):
  """Runs launch/tpu_vm.sh with a stub gcloud that records its arguments, one call a line."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  calls = tmp_path / "gcloud_calls"
  stub = bin_dir / "gcloud"
  stub.write_text(f'#!/bin/bash\nprintf "%s\\037" "$@" >> {calls}\necho >> {calls}\n')
  stub.chmod(0o755)
  full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **env}
  result = subprocess.run(["bash", os.path.join(REPO, "launch/tpu_vm.sh"), *args], capture_output=True,
                          text=True, env=full_env, cwd=REPO)
  lines = calls.read_text().splitlines() if calls.exists() else []
  return result, [line.rstrip("\x1f").split("\x1f") for line in lines]


def test_tpu_script_issues_gcloud_commands_for_every_worker(tmp_path):
  env = dict(PROJECT="proj", ZONE="us-central2-b", TPU_NAME="pod", ACCELERATOR_TYPE="v5litepod-16", SPOT="1")
  result, calls = _tpu_script(tmp_path, "create", **env)
  assert result.returncode == 0, result.stderr
  assert calls[-1] == ["compute", "tpus", "tpu-vm", "create", "pod", "--accelerator-type=v5litepod-16",
                       "--version=v2-alpha-tpuv5-lite", "--spot", "--project=proj", "--zone=us-central2-b"]
  result, calls = _tpu_script(tmp_path, "setup", **env)
  assert result.returncode == 0, result.stderr
  copy, install = calls[-2], calls[-1]
  assert copy[3] == "scp" and copy[5] == "pod:dprl.tar.gz" and "--worker=all" in copy
  assert "--worker=all" in install and any("pip install -q -e ." in a for a in install)
  result, calls = _tpu_script(tmp_path, "run", "python", "-m", "dprl.train", "--workdir", "gs://b/run 1", **env)
  assert result.returncode == 0, result.stderr
  start, follow = calls[-2], calls[-1]
  assert start[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in start
  # Parse the remote command as the worker's shell will: the run's argv must come back intact.
  remote = shlex.split(next(a for a in start if a.startswith("--command="))[len("--command="):])
  assert remote[:6] == ["cd", "dprl", "&&", "setsid", "nohup", "bash"] and remote[6] == "-c"
  assert shlex.split(remote[7]) == ["python", "-m", "dprl.train", "--workdir", "gs://b/run 1"]
  assert "--worker=0" in follow and any("tail" in a for a in follow)
  result, calls = _tpu_script(tmp_path, "stop", **env)
  assert "--worker=all" in calls[-1] and any("kill -- -" in a for a in calls[-1])
  result, calls = _tpu_script(tmp_path, "delete", **env)
  assert calls[-1][:5] == ["compute", "tpus", "tpu-vm", "delete", "pod"] and "--quiet" in calls[-1]


def test_tpu_script_names_a_missing_variable(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "ZONE")}
  result = subprocess.run(["bash", os.path.join(REPO, "launch/tpu_vm.sh"), "delete"], capture_output=True,
                          text=True, env=env)
  assert result.returncode == 2 and "set PROJECT" in result.stderr


# --- two real processes ----------------------------------------------------------------


def _free_port() -> int:
  try:
    import portpicker  # pylint: disable=g-import-not-at-top
    return portpicker.pick_unused_port()
  except ImportError:  # not a declared dependency; any free port will do
    with socket.socket() as s:
      s.bind(("localhost", 0))
      return s.getsockname()[1]


def _worker_env(**extra) -> dict[str, str]:
  """This environment without cluster variables, CPU only, the repository importable."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES) and k not in _CLUSTER_VARS}
  # The session's compilation cache (conftest) is not shared between the two concurrent
  # workers: JAX writes its entries in place, so one could read the other's half-written file.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]), **extra)
  return env


def _start_workers(out, command: list[str] | None = None) -> list[tuple[subprocess.Popen, Any]]:
  """Starts `command` (default tests/multihost_worker.py OUT) as processes 0 and 1 of a
  group on localhost, 4 CPU devices each."""
  command = command or [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"), str(out)]
  port = _free_port()
  procs = []
  for pid in range(2):
    env = _worker_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                      XLA_FLAGS="--xla_force_host_platform_device_count=4")
    log = open(out / f"process_{pid}.log", "w")
    procs.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def _wait_for_workers(procs, out) -> None:
  failed = []
  for pid, (proc, log) in enumerate(procs):
    try:
      rc = proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
      rc = "timeout"
    log.close()
    if rc != 0:
      failed.append(f"process {pid} exited {rc}:\n" + (out / f"process_{pid}.log").read_text()[-3000:])
  for proc, _ in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert not failed, "\n".join(failed)


@pytest.fixture(scope="module")
def two_processes_and_reference(tmp_path_factory):
  """The two-process run's output folder, and the same model and batch on this one process
  (8 devices, same mesh shape), computed while the two processes run."""
  out = tmp_path_factory.mktemp("multihost")
  procs = _start_workers(out)
  try:
    mesh = make_mesh(*multihost_worker.MESH_SHAPE)
    graphdef, state = multihost_worker.init_state(mesh)
    batch = batches.global_batch(multihost_worker.make_batch(), mesh)
    logits = np.asarray(multihost_worker.forward(graphdef, state, batch))
  finally:
    _wait_for_workers(procs, out)
  return out, mesh, state, logits


@pytest.mark.slow
def test_two_processes_form_one_mesh_and_stitch_the_batch_in_process_order(two_processes_and_reference):
  out, *_ = two_processes_and_reference
  report = json.loads((out / "report.json").read_text())
  assert report["kind"] == "explicit" and report["process_count"] == 2
  assert (report["device_count"], report["local_device_count"]) == (8, 4)
  assert report["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(report["batch_is_hosts_in_order"].values()), report["batch_is_hosts_in_order"]


@pytest.mark.slow
def test_two_process_sharded_forward_matches_one_process(two_processes_and_reference):
  out, _, _, reference = two_processes_and_reference
  logits = np.load(out / "logits.npy")
  assert logits.shape == reference.shape
  np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_checkpoint_written_by_two_processes_restores_in_one(two_processes_and_reference):
  out, mesh, reference, _ = two_processes_and_reference
  _, abstract = multihost_worker.abstract_state()
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, state_shardings(abstract, mesh))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(out / "checkpoint", target)
  flat_restored = jax.tree_util.tree_leaves_with_path(restored)
  flat_reference = jax.tree_util.tree_leaves_with_path(reference)
  assert [p for p, _ in flat_restored] == [p for p, _ in flat_reference]
  for (path, got), (_, want) in zip(flat_restored, flat_reference):
    assert got.sharding == want.sharding, path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))


# --- two processes train ---------------------------------------------------------------

# Two GRPO steps of the tiny recipe on a (2, 2, 2) mesh (data across the two processes,
# fsdp and tensor within each), with the KL reference and two updates per step, so the
# sampler, the old/reference log-probs and the accumulated updates all run across hosts.
TRAIN_FLAGS = ["--config", "configs/grpo.py:tiny", "--config.total_steps=2",
               "--config.rl.reward_fn=test_digit_fraction", "--config.rl.beta=0.01",
               "--config.rl.num_iterations=2", "--config.mesh.data=2", "--config.mesh.fsdp=2",
               "--config.mesh.tensor=2", "--config.checkpoint.every=2"]
# Float metrics, compared within LOSS_RTOL. The two runs execute the same global programs
# on the same global batches; what differs is the order of float32 additions: gradient
# all-reduces run across processes (gloo) rather than within one, and each micro-batch
# holds half of every host's rows rather than consecutive rows of one (the accumulated
# sums are exact up to that order). Reassociating float32 sums moves results by a few
# ulp (~1e-7 relative); 1e-4 leaves room for the Adam update amplifying it in step 2 and
# is still far below any real difference (a step changes the loss by ~1e-2).
LOSS_KEYS = ("loss", "pg_loss", "kl_loss", "kl", "grad_norm", "entropy", "ratio", "lr")
LOSS_RTOL = 1e-4
# Counted from sampled tokens: equal exactly, which also shows that both runs sampled the
# same responses.
EXACT_KEYS = ("reward_mean", "accuracy", "response_len", "response_truncated_frac", "tokens",
              "filter_tries", "filter_kept_frac", "zero_advantage_group_frac")


def _train_worker(workdir, *extra: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, "tests", "multihost_train_worker.py"), *TRAIN_FLAGS,
          f"--workdir={workdir}", *extra]


@pytest.fixture(scope="module")
def two_process_training(tmp_path_factory):
  """Workdirs of the two-process run and of its one-process reference (8 devices, the same
  global batches: see tests/multihost_train_worker.py), run one after the other."""
  out = tmp_path_factory.mktemp("multihost_train")
  two, one = out / "two_processes", out / "one_process"
  _wait_for_workers(_start_workers(out, _train_worker(two)), out)
  with open(out / "reference.log", "w") as log:
    rc = subprocess.run(_train_worker(one, "--one_process_reference"), cwd=REPO, stdout=log,
                        stderr=subprocess.STDOUT, timeout=600,
                        env=_worker_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")).returncode
  assert rc == 0, (out / "reference.log").read_text()[-3000:]
  return out, two, one


@pytest.mark.slow
def test_two_process_grpo_logs_the_losses_of_one_process(two_process_training):
  _, two, one = two_process_training
  rows, reference = metrics_lib.read_metrics(str(two)), metrics_lib.read_metrics(str(one))
  assert [r["step"] for r in rows] == [r["step"] for r in reference] == [1, 2]
  assert rows[-1]["kl"] > 0  # step 2 starts away from the reference
  for row, want in zip(rows, reference):
    assert abs(row["loss"]) > 1e-6 and row["grad_norm"] > 0  # not a trivial 0 == 0
    for key in EXACT_KEYS:
      assert row[key] == want[key], (row["step"], key, row[key], want[key])
    for key in LOSS_KEYS:
      np.testing.assert_allclose(row[key], want[key], rtol=LOSS_RTOL, atol=1e-7,
                                 err_msg=f"step {row['step']} {key}")


@pytest.mark.slow
def test_only_process_zero_writes_logs_metrics_and_progress(two_process_training):
  out, two, _ = two_process_training
  assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "config.json", "final_params.npz",
                                                   "metrics.jsonl", "tensorboard", "tokenizer"]
  assert len(list((two / "tensorboard").iterdir())) == 1  # one events file: process 0's
  first, second = (out / "process_0.log").read_text(), (out / "process_1.log").read_text()
  assert "initialising explicit: process 0 of 2" in first
  assert "train: 100%" in first and "train:" not in second
  # Both log joining the group (before they know their index); then only process 0 logs.
  assert "initialising explicit: process 1 of 2" in second
  assert "saving checkpoint of step 2" in first and "saving checkpoint" not in second
  assert '"step": 2' in first and '"step": 2' not in second  # the final summary line


@pytest.mark.slow
def test_checkpoint_written_by_two_processes_restores_the_train_state_in_one(two_process_training):
  _, two, one = two_process_training
  config = cli.load_config("configs/grpo.py:tiny")
  directory = str(two / "checkpoints")
  meta = checkpointing.read_meta(directory, 2)
  mesh = make_mesh(2, 2, 2)
  model_config = from_hf_dict(meta["model_config"], "meta")
  graphdef, abstract_params, _ = train_lib._abstract_params(model_config, mesh)  # pylint: disable=protected-access
  optimizer, _ = train_state_lib.make_optimizer(config.optim.to_dict(), 4)
  abstract = train_state_lib.abstract_train_state(abstract_params, optimizer)
  shardings = train_state_lib.train_state_shardings(abstract, optimizer, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  with checkpointing.Checkpointer(directory) as checkpointer:
    assert checkpointer.all_steps() == [2]
    restored = checkpointer.restore(abstract, abstract_ref=abstract_params)
  assert restored.step == 2 and int(restored.state.step) == 2
  assert restored.data_state == {"next_index": 8}  # each host's iterator: 2 batches of 4 records
  params = checkpointing.flatten(restored.state.params)
  assert all(params[k].sharding == s for k, s in checkpointing.flatten(shardings.params).items())
  written = np.load(two / "final_params.npz")  # what the two processes held at the end
  reference = np.load(one / "final_params.npz")
  assert sorted(written.files) == sorted(params)
  for key, value in params.items():
    np.testing.assert_array_equal(np.asarray(value), written[key], err_msg=key)
    np.testing.assert_allclose(np.asarray(value), reference[key], rtol=0, atol=1e-5, err_msg=key)
  ref = checkpointing.flatten(restored.ref_params)
  assert any(not np.array_equal(np.asarray(ref[k]), written[k]) for k in ref)  # the frozen start
