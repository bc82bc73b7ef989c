"""dprl.parallel: meshes, multi-host initialisation, global batches.

    from dprl import parallel
    parallel.initialize()                                # first, before any other JAX call
    mesh = parallel.make_hybrid_mesh(ici=(1, -1, 1), dcn=(2, 1, 1), granule="process")
    batch = parallel.global_batch(host_batch, mesh)      # this host's rows -> global arrays
"""

from dprl.parallel.batches import (concat_across_processes, every_process, global_batch, is_primary,
                                   primary_only, process_local, process_rows, process_share,
                                   sync_global_devices, to_host)
from dprl.parallel.distributed import Detected, detect, initialize
from dprl.parallel.mesh import AXES, make_hybrid_mesh, make_mesh

__all__ = [
    "AXES", "Detected", "concat_across_processes", "detect", "every_process", "global_batch",
    "initialize", "is_primary", "make_hybrid_mesh", "make_mesh", "primary_only", "process_local",
    "process_rows", "process_share", "sync_global_devices", "to_host",
]
