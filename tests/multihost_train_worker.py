"""One process of the two-process GRPO test in test_distributed.py, or its one-process
reference; run as a script.

    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=p \\
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
    python tests/multihost_train_worker.py --config configs/grpo.py:tiny --workdir DIR [--config.a.b=v ...]

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    python tests/multihost_train_worker.py --one_process_reference --config ... --workdir DIR2

Runs `dprl.train`'s entry point (`run`: flags, `distributed.initialize()` from the JAX_*
variables, training). Two additions, both test-only:

- the reward `test_digit_fraction` (the fraction of digits in a response), so a random
  tiny model gets varied rewards and non-zero advantages from its first step;
- after training, process 0 writes the final parameters, gathered from all processes,
  to DIR/final_params.npz (keys: dotted parameter paths).

With --one_process_reference (one process, 8 devices) the data pipeline reads both
hosts' shards (`Pipeline(process_index=p, process_count=2)`) and concatenates each pair of
batches in process order, left-padded to the wider of the two: the global batches that
two processes form (the sampler gathers the hosts' prompts in process order). Everything
else is the ordinary one-process code.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags

from dprl import train as train_lib
from dprl.data.pipeline import Pipeline
from dprl.parallel import batches
from dprl.rl import checkpointing
from dprl.rl.rewards import REWARD_FNS

REFERENCE_FLAG = "--one_process_reference"
EMULATED_PROCESSES = 2


@REWARD_FNS.register("test_digit_fraction")
def digit_fraction_reward(response: str, reference: str) -> tuple[float, bool]:
  return sum(c.isdigit() for c in response) / max(len(response), 1), reference in response


def stitch(host_batches: list[dict]) -> dict:
  """The global batch of several hosts' pipeline batches, in host order: prompts left-padded
  (with 0, mask 0, as the sampler pads them) to the widest, images and metadata concatenated."""
  width = max(b["input_ids"].shape[1] for b in host_batches)
  pad = lambda x: np.pad(x, ((0, 0), (width - x.shape[1], 0)))
  out = {}
  for key, value in host_batches[0].items():
    values = [b[key] for b in host_batches]
    if key in ("input_ids", "attention_mask"):
      out[key] = np.concatenate([pad(v) for v in values])
    elif isinstance(value, np.ndarray):
      out[key] = np.concatenate(values)
    else:
      out[key] = [item for v in values for item in v]
  return out


class HostBatchesInOrder:
  """An iterator over the stitched batches of several hosts' pipelines (a grain iterator's
  interface: next, get_state, set_state)."""

  def __init__(self, pipelines):
    self.iterators = [iter(p) for p in pipelines]

  def __iter__(self):
    return self

  def __next__(self):
    return stitch([next(it) for it in self.iterators])

  def get_state(self):
    return self.iterators[0].get_state()  # hosts step in lockstep: one state fits all

  def set_state(self, state):
    for it in self.iterators:
      it.set_state(state)


def emulate_hosts(make_pipeline):
  def make(config, records, tokenizer, *, batch_size, **kwargs):
    one = make_pipeline(config, records, tokenizer, batch_size=batch_size // EMULATED_PROCESSES, **kwargs)
    shards = [Pipeline(records, tokenizer, one.config, process_index=p, process_count=EMULATED_PROCESSES)
              for p in range(EMULATED_PROCESSES)]
    return HostBatchesInOrder(shards)
  return make


def save_final_params(train_from_flags, workdir: str):
  def run(flag_values=flags.FLAGS):
    result = train_from_flags(flag_values)
    params = batches.to_host(checkpointing.flatten(result.state.params))  # a collective: all processes
    if batches.is_primary():
      np.savez(os.path.join(workdir, "final_params.npz"), **params)
    return result
  return run


def main(argv: list[str]) -> None:
  if REFERENCE_FLAG in argv:
    argv = [a for a in argv if a != REFERENCE_FLAG]
    train_lib.make_pipeline = emulate_hosts(train_lib.make_pipeline)
  workdir = next(a.split("=", 1)[1] if "=" in a else argv[i + 1]
                 for i, a in enumerate(argv) if a.split("=")[0] == "--workdir")
  train_lib.train_from_flags = save_final_params(train_lib.train_from_flags, workdir)
  train_lib.run(argv)


if __name__ == "__main__":
  main(sys.argv)
