"""Device meshes with the axes every dprl partition rule speaks of: data, fsdp, tensor."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices.

  Uses `jax.make_mesh` ordering (ICI-aware on TPU) when all devices are used.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes (data={data}, fsdp={fsdp}, tensor={tensor}): at most one may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into fsdp*tensor*... = {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
                     f"devices, but {len(devices)} are available")
  # Auto axes: XLA's sharding propagation decides intermediate layouts (GSPMD); the
  # partition rules pin parameters and batches only.
  auto = (AxisType.Auto,) * len(AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(sizes), AXES, devices=devices, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(sizes), AXES, axis_types=auto)
