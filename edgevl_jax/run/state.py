"""Train state and optimisers.

`TrainState` holds everything a resumed run needs, as one pytree that
`checkpoint.Checkpointer` saves: step, params, opt_state, model_state (other
mutable collections, e.g. {'batch_stats': ...}; {} if none) and the base rng
key. Per-step randomness is `state.step_key()` = fold_in(rng, step), computed
inside the jitted step, so a resumed run draws exactly the keys an
uninterrupted run would.

Weight-decay rule (`weight_decay_mask`): a parameter is decayed unless
  * it has ndim <= 1 (biases, norm scales, per-channel gains), or
  * its last path name is 'bias' or 'scale', or
  * a path name (lower-cased) contains one of NO_DECAY_TOKENS: 'norm'
    (LayerNorm, layer_norm, BatchNorm, norm1...), 'position' / 'pos_emb' /
    'pos_embed' (absolute and relative position tables), 'rpe',
    'class_embedding', 'cls' (class tokens), 'logit_scale'.
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
from edgevl_jax.train import config_utils
from edgevl_jax.train import mesh as mesh_lib

NO_DECAY_TOKENS = ('norm', 'position', 'pos_emb', 'pos_embed', 'rpe',
                   'class_embedding', 'cls', 'logit_scale')
NO_DECAY_NAMES = ('bias', 'scale')
OPTIMIZERS = ('adamw', 'sgd', 'adam')
SCHEDULES = ('cosine', 'step', 'constant')
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


def weight_decay_mask(params: Any) -> Any:
  """A bool tree like `params`: True where weight decay applies (module doc)."""

  def decide(path, leaf):
    names = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
             for k in path]
    if jnp.ndim(leaf) <= 1 or (names and names[-1] in NO_DECAY_NAMES):
      return False
    lowered = [n.lower() for n in names]
    return not any(tok in n for n in lowered for tok in NO_DECAY_TOKENS)

  return jax.tree_util.tree_map_with_path(decide, params)


def _opt(optim_config: Any, key: str, default: Any) -> Any:
  value = config_utils.get(optim_config, key, default)
  return default if value is None else value


def validate_optim_config(optim_config: Any, prefix: str = 'optim') -> None:
  """Raises ValueError naming `optim.<key>` for a bad optimiser config."""
  cfg = {'optim': optim_config}
  config_utils.require(cfg, 'optim.name', allowed=OPTIMIZERS)
  config_utils.require_positive(cfg, 'optim.lr')
  schedule = _opt(optim_config, 'schedule', 'cosine')
  if schedule not in SCHEDULES:
    raise ValueError(f'config.{prefix}.schedule must be one of '
                     f'{list(SCHEDULES)}, found {schedule!r}.')
  for key in ('weight_decay', 'end_lr', 'warmup_steps', 'grad_clip_norm'):
    value = _opt(optim_config, key, 0)
    if not isinstance(value, (int, float)) or value < 0:
      raise ValueError(f'config.{prefix}.{key} must be a number >= 0, found '
                       f'{value!r}.')
  milestones = list(_opt(optim_config, 'milestones', ()))
  increasing = milestones == sorted(milestones)
  if schedule == 'step' and (not milestones or not increasing):
    raise ValueError(f'config.{prefix}.milestones must be increasing step '
                     f'numbers for schedule="step", found {milestones!r}.')


def make_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
  """Per-step learning rate.

  optim_config keys: lr, schedule ('cosine' default | 'step' | 'constant'),
  end_lr (cosine, default 0), warmup_steps (linear 0 -> lr, default 0),
  milestones (step: step numbers where lr is multiplied by decay_factor,
  default 0.1). Cosine reaches end_lr at `total_steps`.
  """
  lr = float(optim_config.lr)
  schedule = _opt(optim_config, 'schedule', 'cosine')
  warmup = int(_opt(optim_config, 'warmup_steps', 0))
  if schedule == 'cosine':
    end_lr = float(_opt(optim_config, 'end_lr', 0.0))
    if warmup:
      return optax.warmup_cosine_decay_schedule(
          0.0, lr, warmup, max(total_steps, warmup + 1), end_value=end_lr)
    return optax.cosine_decay_schedule(lr, max(total_steps, 1),
                                       alpha=end_lr / lr)
  if schedule == 'step':
    factor = float(_opt(optim_config, 'decay_factor', 0.1))
    main = optax.piecewise_constant_schedule(
        lr, {int(m): factor for m in _opt(optim_config, 'milestones', ())})
  else:
    main = optax.constant_schedule(lr)
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def make_optimizer(optim_config: Any,
                   total_steps: int) -> optax.GradientTransformation:
  """AdamW / SGD+momentum / Adam with schedule, weight decay and clipping.

  optim_config keys (besides the schedule keys of `make_schedule`):
    name: 'adamw' (decoupled decay, b1 0.9, b2 0.999, eps 1e-8 defaults),
      'sgd' (momentum 0.9, nesterov False), 'adam'.
    weight_decay: default 0. For 'sgd' and 'adam' it is L2 added to the
      gradient (PyTorch semantics).
    decay_mask: 'auto' (default: masked by `weight_decay_mask` for adamw,
      every parameter for sgd/adam as in PyTorch), 'rule' or 'all'.
    grad_clip_norm: global-norm clip (0/None = off).
    b1, b2, eps, momentum, nesterov.
  """
  validate_optim_config(optim_config)
  name = optim_config.name
  lr = make_schedule(optim_config, total_steps)
  wd = float(_opt(optim_config, 'weight_decay', 0.0))
  decay_mask = _opt(optim_config, 'decay_mask', 'auto')
  if decay_mask not in ('auto', 'rule', 'all'):
    raise ValueError("config.optim.decay_mask must be 'auto', 'rule' or "
                     f"'all', found {decay_mask!r}.")
  use_rule = decay_mask == 'rule' or (decay_mask == 'auto' and name == 'adamw')
  mask = weight_decay_mask if use_rule else None
  b1 = float(_opt(optim_config, 'b1', 0.9))
  b2 = float(_opt(optim_config, 'b2', 0.999))
  eps = float(_opt(optim_config, 'eps', 1e-8))
  chain = []
  clip = float(_opt(optim_config, 'grad_clip_norm', 0.0))
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip))
  if name == 'adamw':
    chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                             mask=mask))
  else:
    if wd > 0:
      chain.append(optax.add_decayed_weights(wd, mask=mask))
    if name == 'sgd':
      chain.append(optax.sgd(lr, momentum=float(_opt(optim_config, 'momentum',
                                                     0.9)),
                             nesterov=bool(_opt(optim_config, 'nesterov',
                                                False))))
    else:
      chain.append(optax.adam(lr, b1=b1, b2=b2, eps=eps))
  return optax.chain(*chain)
