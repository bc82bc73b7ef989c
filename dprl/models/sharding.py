"""Partition rules of Qwen2.5-VL as data: parameter path regex -> PartitionSpec.

Mesh axes: `data` (batch only), `fsdp` (parameters and optimizer state sharded, gathered
per layer), `tensor` (Megatron-style: column-parallel q/k/v, gate/up; row-parallel o, down).
Stacked layer parameters carry a leading layer axis, which is never sharded. The first
rule whose regex matches (re.search) a dotted path wins.

Activations have rules too (`ACTIVATION_RULES`, logical name -> PartitionSpec), applied by
`constrain` inside the model when a mesh is in context (`jax.sharding.use_abstract_mesh`,
as the learner traces under its mesh). Without them XLA's propagation follows the
parameters and splits the residual stream over the hidden size (the embedding's
`P("tensor", "fsdp")`), so every fsdp device computes every row of a micro-batch.
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


# Batch rows are split over both data-parallel axes: fsdp gathers parameters per layer, so
# each of its devices must compute its own rows (as `data` does).
BATCH_AXES = ("data", "fsdp")

ACTIVATION_RULES: dict[str, P] = {
    # The decoder's residual stream [B, T, D] (embedding output and every layer's output):
    # rows over the batch axes, positions over `tensor` (Megatron's sequence parallelism:
    # row-parallel o/down reduce-scatter into it, column-parallel q/k/v, gate/up gather it).
    "residual": P(BATCH_AXES, "tensor", None),
    # The vision tower's patch stream [N, D] (window order): patches over the batch axes
    # (images arrive replicated; block-local attention gathers what crosses a split).
    "patches": P(BATCH_AXES, None),
}


def activation_spec(name: str, shape: tuple[int, ...], mesh,
                    rules: dict[str, P] = ACTIVATION_RULES) -> P | None:
  """The rule's spec for activation `name` of `shape` on `mesh` (concrete or abstract), or
  None (unconstrained) when there is no rule for `name`, or an axis of the rule does not
  divide its dimension or is not in the mesh.

  Unlike parameters (`spec_for` replicates a non-dividing dimension), an activation that
  does not split is left unconstrained: replicating it would be worse than letting XLA choose.
  """
  spec = rules.get(name)
  if spec is None:
    return None
  fitted = []
  for i, (dim, axis) in enumerate(zip(shape, spec)):
    names = (axis,) if isinstance(axis, str) else tuple(axis or ())
    if any(n not in mesh.shape for n in names):
      return None
    size = 1
    for n in names:
      size *= mesh.shape[n]
    if dim % size:
      if i == 0:
        return None
      axis = None  # e.g. a sequence that does not split over tensor: replicated there
    fitted.append(axis)
  return P(*fitted)


def constrain(x: jax.Array, name: str, rules: dict[str, P] = ACTIVATION_RULES) -> jax.Array:
  """`x` constrained to activation rule `name` on the mesh in context; `x` itself when no
  mesh is in context (one device, or a caller that does not set one) or the rule does not
  divide `x`'s shape."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = activation_spec(name, tuple(x.shape), mesh, rules)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


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
