"""Device mesh and shardings: the 'pjit' of today (`jax.jit` + shardings).

The mesh has named axes ('data', 'fsdp'). The batch is split over both; model
parameters are laid out from their logical axis names
(`edgevl_jax.models.layers.LOGICAL_AXIS_RULES`: width dims over 'fsdp',
small tensors replicated). A frozen teacher is initialised/loaded directly
with fsdp-sharded params (`shard_params`) and never checkpointed.

Typical use in a trainer:

  mesh = make_mesh(config.get('mesh'))
  abstract = jax.eval_shape(model.init, rngs, dummy)        # boxed variables
  shardings = param_shardings(abstract, mesh)               # same tree, unboxed
  step = jit_sharded(train_step, in_shardings=(state_sh, batch_sharding(mesh)),
                     out_shardings=(state_sh, replicated(mesh)),
                     donate_argnums=(0,))
  batch = shard_batch(host_batch, mesh)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from edgevl_jax.models import layers

AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')
# Every weight axis replicated; only the batch is split (small students).
REPLICATED_RULES = tuple((name, None) for name, _ in layers.LOGICAL_AXIS_RULES
                         if name != layers.BATCH) + ((layers.BATCH, BATCH_AXES),)


def _axis_sizes(mesh_config: Any, n: int) -> tuple[int, ...]:
  """Resolves mesh sizes; at most one -1 (= the remaining devices)."""
  cfg = {} if mesh_config is None else dict(mesh_config)
  unknown = set(cfg) - set(AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; '
                     f'allowed axes: {list(AXES)}.')
  sizes = [int(cfg.get('data', -1)), int(cfg.get('fsdp', 1))]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, found {cfg}.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh sizes must be positive or -1, found {cfg}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f'config.mesh={cfg}: {n} devices are not divisible by '
                       f'{known}.')
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f'config.mesh={cfg} uses {math.prod(sizes)} devices but '
                     f'{n} are available; use -1 for "the rest".')
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with axes ('data', 'fsdp') and Auto axis types.

  Args:
    mesh_config: {'data': int, 'fsdp': int}, -1 meaning "the rest of the
      devices"; default: all devices on 'data', fsdp=1.
    devices: devices to use (default: all global devices).

  Returns:
    jax.sharding.Mesh of shape (data, fsdp).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = _axis_sizes(mesh_config, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(sizes, AXES, axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), AXES,
                           axis_types=auto)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Fully replicated sharding (scalars, metrics, rng keys, step)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) dim split over ('data', 'fsdp'); the rest replicated."""
  return jax.sharding.NamedSharding(mesh,
                                    jax.sharding.PartitionSpec(BATCH_AXES))


def param_shardings(abstract_variables: Any, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Any]] = layers.LOGICAL_AXIS_RULES
                    ) -> Any:
  """NamedShardings for (boxed) variables from their logical axis names.

  Args:
    abstract_variables: output of `jax.eval_shape(model.init, ...)` (leaves
      may be `nn.LogicallyPartitioned` boxes; unboxed leaves are replicated).
    mesh: the mesh.
    rules: logical -> mesh axis rules.

  Returns:
    A tree with the structure of `nn.unbox(abstract_variables)` whose leaves
    are `NamedSharding`s. A logical dim whose size does not divide by its mesh
    axis is replicated instead (tiny heads, odd class counts).
  """
  specs = nn.get_partition_spec(abstract_variables)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.unbox(abstract_variables)

  def fit(sharding, shape):
    spec = list(sharding.spec)
    spec += [None] * (len(shape.shape) - len(spec))
    for i, axis in enumerate(spec):
      if axis is None:
        continue
      names = axis if isinstance(axis, tuple) else (axis,)
      size = math.prod(mesh.shape[a] for a in names)
      if shape.shape[i] % size:
        spec[i] = None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

  return jax.tree.map(fit, shardings, shapes)


def shard_params(init_fn: Callable[..., Any], *args: Any,
                 mesh: jax.sharding.Mesh,
                 rules: Sequence[tuple[str, Any]] = layers.LOGICAL_AXIS_RULES
                 ) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` (e.g. `model.init`) directly into sharded arrays.

  No full copy is ever materialised on one device, which is how a 1 B-param
  teacher fits. `init_fn` may also be any function returning boxed params
  (e.g. one that converts loaded weights).

  Returns:
    (unboxed variables as sharded jax.Arrays, their shardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(abstract, mesh, rules)
  fn = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)
  return fn(*args), shardings


def put_sharded(tree: Any, shardings: Any) -> Any:
  """Places host or device arrays on the given shardings (same structure)."""
  return jax.tree.map(jax.device_put, tree, shardings)


def per_process_batch(global_batch_size: int) -> int:
  """The slice of a global batch this process loads (loaders are per process).

  Config batch sizes are global, so a run gives the same result on any number
  of processes; each process's loader yields `global / process_count`.
  """
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(
        f'batch size {global_batch_size} is not divisible by the '
        f'{count} JAX processes; use a multiple of {count}.')
  return global_batch_size // count


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host-local numpy batch -> global jax.Arrays split over the batch axes.

  Each process passes its own slice (global batch / process_count examples);
  on one host this is simply the whole batch.
  """
  sharding = batch_sharding(mesh)
  ways = math.prod(mesh.shape[a] for a in BATCH_AXES)

  def put(x):
    x = np.asarray(x)
    global_size = x.shape[0] * jax.process_count()
    if global_size % ways:
      raise ValueError(
          f'Global batch size {global_size} is not divisible by the {ways} '
          f'devices of the mesh batch axes {dict(mesh.shape)}; use a batch '
          'size that is a multiple of it.')
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


def jit_sharded(fn: Callable[..., Any], *, in_shardings: Any,
                out_shardings: Any, donate_argnums: int | Sequence[int] = (),
                static_argnums: int | Sequence[int] = ()) -> Callable[..., Any]:
  """`jax.jit` with explicit in/out shardings and buffer donation.

  Shardings are trees matching the arguments/outputs (a single sharding
  broadcasts over a whole subtree). Donate the train state (argnum 0) so its
  buffers are reused in place.
  """
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=donate_argnums, static_argnums=static_argnums)


def tree_shardings(tree: Any) -> Any:
  """The `.sharding` of every jax.Array leaf of `tree`."""
  return jax.tree.map(lambda x: x.sharding, tree)
