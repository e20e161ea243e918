"""Train state: everything a resumed run needs, as one sharded pytree.

`TrainState` holds everything a resumed run needs, as one pytree that
`checkpoint.Checkpointer` saves: step, params, opt_state, model_state (other
mutable collections, e.g. {'batch_stats': ...}; {} if none) and the base rng
key. Per-step randomness is `state.step_key()` = fold_in(rng, step), computed
inside the jitted step, so a resumed run draws exactly the keys an
uninterrupted run would.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from edgevl_jax.models import layers
from edgevl_jax.run import mesh as mesh_lib

# Collections that model.init fills but that are outputs, not state.
EPHEMERAL_COLLECTIONS = ('intermediates', layers.BN_STATS)


class TrainState(struct.PyTreeNode):
  """The student's full training state (a pytree; `tx` is static).

  Attributes:
    step: int32 scalar, number of optimiser steps taken.
    params: the trained parameters (unboxed).
    opt_state: optax state of `tx`.
    model_state: other mutable variable collections ({} if none).
    rng: base PRNG key (uint32[2]); never advanced, folded with `step`.
    tx: the optimiser (not part of the pytree, not checkpointed).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def step_key(self, *names: int | str) -> jax.Array:
    """The key of the current step, optionally folded with names/ints.

    `state.step_key('dropout')` and `state.step_key('noise')` are independent.
    """
    key = jax.random.fold_in(self.rng, self.step)
    for name in names:
      data = name if isinstance(name, int) else _str_to_int(name)
      key = jax.random.fold_in(key, data)
    return key

  def apply_gradients(self, grads: Any, **updates: Any) -> 'TrainState':
    """One optimiser step; `updates` replace other fields (e.g. model_state)."""
    deltas, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, deltas)
    return self.replace(step=self.step + 1, params=params,
                        opt_state=opt_state, **updates)

  @property
  def variables(self) -> dict[str, Any]:
    """{'params': params, **model_state}, ready for `model.apply`."""
    return {'params': self.params, **self.model_state}


def _str_to_int(name: str) -> int:
  # A stable (process-independent) hash: Python's hash() is salted.
  value = 0
  for ch in name.encode():
    value = (value * 131 + ch) % (2**31 - 1)
  return value


def create_train_state(
    init_fn: Callable[[jax.Array], Mapping[str, Any]],
    tx: optax.GradientTransformation, rng: jax.Array, *,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Any]] = layers.LOGICAL_AXIS_RULES,
    drop_collections: Sequence[str] = EPHEMERAL_COLLECTIONS,
) -> tuple[TrainState, TrainState]:
  """Initialises a sharded TrainState (never materialised unsharded).

  Args:
    init_fn: key -> variables {'params': ..., other collections} (boxed with
      logical axes or plain), e.g. `lambda k: model.init(k, dummy)` or a
      function returning weights loaded from an earlier stage.
    tx: optimiser, e.g. from `make_optimizer`.
    rng: a PRNG key; split into the init key and the state's base key.
    mesh: the device mesh; params follow `rules`, the rest is replicated.
    rules: logical -> mesh axis rules.
    drop_collections: collections `model.init` fills that are per-call
      outputs, not state (sown intermediates, BatchNorm input moments).

  Returns:
    (state, shardings): shardings is a TrainState of NamedShardings, ready
    for `mesh.jit_sharded` in/out shardings and checkpoint restore.
  """
  init_key, base_key = jax.random.split(rng)

  def init_variables(key):
    variables = dict(flax.core.unfreeze(init_fn(key)))
    return {k: v for k, v in variables.items() if k not in drop_collections}

  abstract = jax.eval_shape(init_variables, init_key)
  var_sh = mesh_lib.param_shardings(abstract, mesh, rules)
  if 'params' not in var_sh:
    raise ValueError(f'init_fn must return a dict with a "params" collection; '
                     f'found collections {sorted(var_sh)}.')
  var_sh = dict(var_sh)
  p_sh = var_sh.pop('params')
  rep = mesh_lib.replicated(mesh)
  abstract_params = nn.unbox(abstract)['params']
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), p_sh,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  shardings = TrainState(step=rep, params=p_sh, opt_state=opt_sh,
                         model_state=var_sh, rng=rep, tx=tx)

  def build(init_key, base_key):
    variables = nn.unbox(init_variables(init_key))
    params = variables.pop('params')
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), model_state=variables,
                      rng=base_key, tx=tx)

  state = jax.jit(build, out_shardings=shardings)(init_key, base_key)
  return state, shardings
