"""Per-process numpy batches -> global jax.Arrays on a mesh's data axes."""
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def batch_sharding(mesh: jax.sharding.Mesh,
                   data_axes: Sequence[str] = DATA_AXES) -> NamedSharding:
  """Leading (batch) dimension split over the mesh's data-parallel axes.

  Axes of `data_axes` the mesh does not have are skipped, so a mesh with
  only a 'data' axis works too.
  """
  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"Mesh axes {mesh.axis_names} contain none of the data "
                     f"axes {tuple(data_axes)}; name a data-parallel axis.")
  return NamedSharding(mesh, P(axes))


def to_global(batch: dict[str, Any], mesh: jax.sharding.Mesh,
              data_axes: Sequence[str] = DATA_AXES) -> dict[str, Any]:
  """Turns this process's batch into global arrays (batch dim sharded).

  Args:
    batch: dict of numpy arrays (B_local, ...) from a loader of this process.
    mesh: the training mesh.
    data_axes: mesh axes the batch dimension is split over.

  Returns:
    dict of jax.Array with global batch B_local * process_count; string
    fields (captions) cannot live on devices and stay per-process numpy.
  """
  sharding = batch_sharding(mesh, data_axes)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "USO":
      out[k] = v
    else:
      out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
