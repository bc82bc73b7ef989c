"""Partition rules of Qwen2.5-VL as data: parameter path regex -> PartitionSpec.

Mesh axes: `data` (batch only), `fsdp` (parameters and optimizer state sharded, gathered
per layer), `tensor` (Megatron-style: column-parallel q/k/v, gate/up; row-parallel o, down).
Stacked layer parameters carry a leading layer axis, which is never sharded. The first
rule whose regex matches (re.search) a dotted path wins.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import nnx

log = logging.getLogger(__name__)

PARTITION_RULES: tuple[tuple[str, P], ...] = (
    # Text decoder, stacked layers [L, in, out].
    (r"model\.layers\.self_attn\.(q|k|v)_proj\.kernel$", P(None, "fsdp", "tensor")),
    (r"model\.layers\.self_attn\.(q|k|v)_proj\.bias$", P(None, "tensor")),
    (r"model\.layers\.self_attn\.o_proj\.kernel$", P(None, "tensor", "fsdp")),
    (r"model\.layers\.mlp\.(gate|up)_proj\.kernel$", P(None, "fsdp", "tensor")),
    (r"model\.layers\.mlp\.down_proj\.kernel$", P(None, "tensor", "fsdp")),
    (r"model\.embed_tokens\.embedding$", P("tensor", "fsdp")),
    (r"^lm_head$", P("fsdp", "tensor")),
    # Vision tower, stacked blocks [L, in, out].
    (r"visual\.blocks\.attn\.qkv\.kernel$", P(None, "fsdp", "tensor")),
    (r"visual\.blocks\.attn\.qkv\.bias$", P(None, "tensor")),
    (r"visual\.blocks\.attn\.proj\.kernel$", P(None, "tensor", "fsdp")),
    (r"visual\.blocks\.mlp\.(gate|up)_proj\.kernel$", P(None, "fsdp", "tensor")),
    (r"visual\.blocks\.mlp\.(gate|up)_proj\.bias$", P(None, "tensor")),
    (r"visual\.blocks\.mlp\.down_proj\.kernel$", P(None, "tensor", "fsdp")),
    (r"visual\.merger\.fc1\.kernel$", P("fsdp", "tensor")),
    (r"visual\.merger\.fc1\.bias$", P("tensor")),
    (r"visual\.merger\.fc2\.kernel$", P("tensor", "fsdp")),
    (r"visual\.patch_embed\.kernel$", P(None, "fsdp")),
    # Norm scales, remaining biases: replicated.
    (r".*", P()),
)


def path_str(path: Sequence) -> str:
  """Dotted parameter path from a pytree key path, without the Variable's own `.value`."""
  keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  if keys and keys[-1] == "value":
    keys = keys[:-1]
  return ".".join(keys)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh,
             rules: Sequence[tuple[str, P]] = PARTITION_RULES) -> P:
  """The rule's spec for `path`, with any axis that does not divide its dimension dropped.

  Dropping (replicating that dimension) rather than failing lets one rule set serve every
  preset and mesh; it is logged because it costs memory.
  """
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    return P()
  fitted = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axis,) if isinstance(axis, str) else tuple(axis or ())
    size = 1
    for name in names:
      size *= mesh.shape.get(name, 1)
    if names and dim % size:
      log.info("replicating dim %d of %s: %s (size %d) does not divide it", dim, path, axis, size)
      axis = None
    fitted.append(axis)
  return P(*fitted)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, P]] = PARTITION_RULES):
  """A NamedSharding for every leaf of `state` (concrete or abstract), same structure."""

  def one(path, leaf):
    return NamedSharding(mesh, spec_for(path_str(path), tuple(leaf.shape), mesh, rules))

  return jax.tree_util.tree_map_with_path(one, state)
