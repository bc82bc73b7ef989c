"""Device meshes with the axes every dprl partition rule speaks of: data, fsdp, tensor."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
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


def make_hybrid_mesh(ici: Sequence[int] = (-1, 1, 1), dcn: Sequence[int] = (1, 1, 1), *,
                     granule: str = "slice", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over several slices (or hosts) joined by the data-centre network.

  `ici` splits the devices of one granule (fast interconnect), `dcn` splits the granules,
  so axis i has size ici[i] * dcn[i] and its dcn part is outermost. Put the axes with the
  least traffic (usually data, then fsdp) on dcn. One ici size may be -1: the devices of
  a granule left over.

  granule: "slice" (TPU multi-slice: devices carry `slice_index`) or "process" (each
    host is a granule: GPU clusters, or CPU processes in tests).
  With dcn all ones this is `make_mesh(*ici)`, which works on any backend.
  """
  ici, dcn = list(ici), list(dcn)
  if len(ici) != len(AXES) or len(dcn) != len(AXES):
    raise ValueError(f"ici={tuple(ici)} and dcn={tuple(dcn)} must each give {len(AXES)} sizes {AXES}")
  if granule not in ("slice", "process"):
    raise ValueError(f"granule must be 'slice' or 'process', got {granule!r}")
  if any(d < 1 for d in dcn):
    raise ValueError(f"dcn sizes must be >= 1, got {tuple(dcn)}")
  devices = list(devices if devices is not None else jax.devices())
  if int(np.prod(dcn)) == 1:
    return make_mesh(*ici, devices=devices)
  if granule == "slice":
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None in slices:
      raise ValueError(
          f"dcn={tuple(dcn)} asks for {int(np.prod(dcn))} slices, but {devices[0].platform} devices have "
          "no slice_index (only multi-slice TPU does); use granule='process' to split across hosts, "
          "or dcn=(1, 1, 1) for one slice")
    granules = len(slices)
  else:
    granules = len({d.process_index for d in devices})
  if granules != int(np.prod(dcn)):
    raise ValueError(f"dcn={tuple(dcn)} needs {int(np.prod(dcn))} granules (granule={granule!r}), "
                     f"found {granules}")
  per_granule = len(devices) // granules
  if ici.count(-1) > 1:
    raise ValueError(f"ici={tuple(ici)}: at most one size may be -1")
  if -1 in ici:
    known = int(np.prod([s for s in ici if s != -1]))
    if per_granule % known:
      raise ValueError(f"{per_granule} devices per {granule} do not divide into ici={tuple(ici)}")
    ici[ici.index(-1)] = per_granule // known
  if int(np.prod(ici)) != per_granule:
    raise ValueError(f"ici={tuple(ici)} uses {int(np.prod(ici))} devices per {granule}, "
                     f"but each has {per_granule}")
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=granule == "process")
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
