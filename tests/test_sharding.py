"""Activation sharding rules: the decoder's residual stream keeps its rows split over the
batch axes when a mesh is in context, and nothing changes without one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dprl.models import qwen2_5_vl
from dprl.models import sharding
from dprl.parallel import make_mesh

# Rows over the batch axes, positions over tensor (sequence parallelism), hidden whole.
RESIDUAL_SHARDING = '[{"data", "fsdp"}, {"tensor"}, {}]'


@pytest.fixture(scope="module")
def model():
  return qwen2_5_vl.init("tiny")


def lowered_forward(model, rows: int, mesh=None) -> str:
  graphdef, state = nnx.split(model)

  def forward(state, input_ids):
    m = nnx.merge(graphdef, state)
    if mesh is None:
      return m(input_ids).logits
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return m(input_ids).logits

  input_ids = jax.ShapeDtypeStruct((rows, 8), jnp.int32)
  return jax.jit(forward).lower(state, input_ids).as_text()


def test_residual_stream_rows_are_split_over_data_and_fsdp_under_a_mesh(model):
  text = lowered_forward(model, rows=8, mesh=make_mesh(2, 2, 2))
  d = model.config.text.hidden_size
  constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
  assert constraints and all(RESIDUAL_SHARDING in line for line in constraints)
  assert any(f"tensor<8x8x{d}x" in line for line in constraints)  # [B, T, D]


def test_without_a_mesh_or_a_dividing_batch_nothing_is_constrained(model):
  assert "sharding_constraint" not in lowered_forward(model, rows=8)
  # 4 rows do not split over data x fsdp = 8: left to XLA, not replicated.
  assert "sharding_constraint" not in lowered_forward(model, rows=4, mesh=make_mesh(2, 4, 1))


def test_activation_spec_drops_the_rule_when_the_rows_do_not_split_or_an_axis_is_missing():
  mesh = make_mesh(1, 4, 2)
  assert sharding.activation_spec("residual", (8, 16, 32), mesh) == sharding.ACTIVATION_RULES["residual"]
  assert sharding.activation_spec("residual", (6, 16, 32), mesh) is None
  # Positions that do not split over tensor (a one-token decode step) stay whole there.
  assert sharding.activation_spec("residual", (8, 1, 32), mesh) == P(("data", "fsdp"), None, None)
  assert sharding.activation_spec("no_such_activation", (8, 16, 32), mesh) is None
  other = jax.sharding.AbstractMesh((8,), ("rows",))
  assert sharding.activation_spec("residual", (8, 16, 32), other) is None


def test_vision_patches_split_over_the_batch_axes_when_they_divide():
  mesh = make_mesh(2, 4, 1)
  assert sharding.activation_spec("patches", (64, 32), mesh) == P(("data", "fsdp"), None)
  assert sharding.activation_spec("patches", (60, 32), mesh) is None
