"""One process of the multi-process CPU tests in test_distributed.py; run as a script.

    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=p \\
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
    python tests/multihost_worker.py OUT_DIR

Joins the group through `dprl.parallel.distributed.initialize()` (the JAX_* variables),
builds one global mesh over both processes' devices, runs the sharded forward of the tiny
Qwen2.5-VL on a global batch stitched from each process's rows, and writes an Orbax
checkpoint of the model state from every process. Process 0 writes the logits and a
report to OUT_DIR. The test imports the helpers below to compute its one-process reference
with exactly the same code.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dprl.models import qwen2_5_vl
from dprl.models.config import get_preset
from dprl.models.sharding import state_shardings
from dprl.parallel import distributed
from dprl.parallel.batches import global_batch, is_primary, primary_only, sync_global_devices, to_host
from dprl.parallel.mesh import make_hybrid_mesh

GLOBAL_BATCH = 4
IMAGE_GRID = (1, 4, 4)  # one image per row: 16 patches, 4 merged image tokens
TEXT_LEN = 6
MESH_SHAPE = (2, 2, 2)  # (data, fsdp, tensor)


def make_batch():
  """The full global batch (NumPy): every row has the same length and one image of the same size.

  Equal shapes per row make each host's slice equal in shape, as `global_batch` requires.
  """
  cfg = get_preset("tiny")
  rng = np.random.default_rng(0)
  t, h, w = IMAGE_GRID
  n_image_tokens = t * h * w // cfg.vision.spatial_merge_size**2
  rows = []
  for _ in range(GLOBAL_BATCH):
    rows.append(list(rng.integers(0, 280, 2)) + [cfg.vision_start_token_id]
                + [cfg.image_token_id] * n_image_tokens + [cfg.vision_end_token_id]
                + list(rng.integers(0, 280, TEXT_LEN)))
  input_ids = np.array(rows, np.int32)
  attention_mask = np.ones_like(input_ids)
  attention_mask[1, :2] = 0  # one left-padded row
  pixel_values = rng.standard_normal((GLOBAL_BATCH * t * h * w, cfg.vision.patch_dim)).astype(np.float32)
  image_grid_thw = np.array([IMAGE_GRID] * GLOBAL_BATCH, np.int32)
  return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
              image_grid_thw=image_grid_thw)


def local_rows(batch, process_index: int, process_count: int):
  """This process's slice of `make_batch()`: its rows, their patches and their grids."""
  per_host = GLOBAL_BATCH // process_count
  rows = slice(process_index * per_host, (process_index + 1) * per_host)
  patches = batch["pixel_values"].shape[0] // GLOBAL_BATCH * per_host
  return dict(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
              pixel_values=batch["pixel_values"][process_index * patches:(process_index + 1) * patches],
              image_grid_thw=batch["image_grid_thw"][rows])


def abstract_state():
  return nnx.split(qwen2_5_vl.abstract(get_preset("tiny")))


def init_state(mesh):
  """The tiny model's (graphdef, state), initialised directly into its partition-rule shardings.

  Initialising under jit with out_shardings is what works across hosts: every process runs
  the same init and keeps only its shards (no host ever holds the whole model).
  """
  graphdef, abstract = abstract_state()
  shardings = state_shardings(abstract, mesh)
  state = jax.jit(lambda: nnx.state(qwen2_5_vl.init("tiny", seed=0)), out_shardings=shardings)()
  return graphdef, state


def forward(graphdef, state, batch):
  """logits [B, T, V] of a (global) batch."""

  @jax.jit
  def run(state, input_ids, attention_mask, pixel_values, image_grid_thw):
    model = nnx.merge(graphdef, state)
    return model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                 image_grid_thw=image_grid_thw).logits

  return run(state, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
             batch["image_grid_thw"])


def main(out_dir: str) -> None:
  # Importing jax starts no backend; this is the first call that would, as it must be.
  detected = distributed.initialize()  # from JAX_COORDINATOR_ADDRESS etc.
  assert distributed.initialize() is detected, "initialize must be idempotent"

  # Hosts are the granules: data splits across processes (DCN), fsdp and tensor within one.
  data, fsdp, tensor = MESH_SHAPE
  procs = jax.process_count()
  mesh = make_hybrid_mesh(ici=(data // procs, fsdp, tensor), dcn=(procs, 1, 1), granule="process")
  full = make_batch()
  batch = global_batch(local_rows(full, jax.process_index(), procs), mesh)
  graphdef, state = init_state(mesh)
  logits = to_host(forward(graphdef, state, batch))
  stitched = {k: to_host(v) for k, v in batch.items()}

  # Every process writes its shards; Orbax coordinates the hosts itself.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, "checkpoint"), state)
  checkpointer.wait_until_finished()
  checkpointer.close()
  sync_global_devices("multihost_worker_checkpoint_written")

  @primary_only
  def write_report():
    np.save(os.path.join(out_dir, "logits.npy"), logits)
    report = dict(
        detected=detected.summary(), kind=detected.kind, process_count=procs,
        device_count=jax.device_count(), local_device_count=jax.local_device_count(),
        mesh_shape=dict(mesh.shape),
        batch_is_hosts_in_order={k: bool(np.array_equal(stitched[k], full[k])) for k in full},
        logits_shape=list(logits.shape))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
      json.dump(report, f, indent=1)
    return True

  wrote = write_report()
  assert bool(wrote) == is_primary()


if __name__ == "__main__":
  main(sys.argv[1])
