"""Optimisers and learning-rate schedules from `config.optim` (optax).

Weight-decay rule (`weight_decay_mask`): a parameter is decayed unless
  * it has ndim <= 1 (biases, norm scales, per-channel gains), or
  * its last path name is 'bias' or 'scale', or
  * a path name (lower-cased) contains one of NO_DECAY_TOKENS: 'norm'
    (LayerNorm, layer_norm, BatchNorm, norm1...), 'position' / 'pos_emb' /
    'pos_embed' (absolute and relative position tables), 'rpe',
    'class_embedding', 'cls' (class tokens), 'logit_scale'.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from edgevl_jax.run import config as config_lib

NO_DECAY_TOKENS = ('norm', 'position', 'pos_emb', 'pos_embed', 'rpe',
                   'class_embedding', 'cls', 'logit_scale')
NO_DECAY_NAMES = ('bias', 'scale')
OPTIMIZERS = ('adamw', 'sgd', 'adam')
SCHEDULES = ('cosine', 'step', 'constant')
f = config_lib.field
# The `optim` sub-config of every training job.
OPTIM_SCHEMA: config_lib.Schema = {
    'name': f('adamw', "'adamw' (decoupled decay), 'sgd' (momentum) or "
              "'adam'"),
    'lr': f(1e-3, 'peak learning rate'),
    'schedule': f('cosine', "'cosine', 'step' or 'constant'"),
    'end_lr': f(0.0, 'cosine: final learning rate'),
    'warmup_steps': f(0, 'linear warm-up steps from 0'),
    'milestones': f((), "'step': steps where lr is multiplied by "
                    'decay_factor'),
    'decay_factor': f(0.1, "'step': factor at each milestone"),
    'weight_decay': f(0.0, 'adamw: decoupled; sgd/adam: L2 on the gradient'),
    'decay_mask': f('auto', "'auto' (rule for adamw, all for sgd/adam), "
                    "'rule' or 'all'"),
    'grad_clip_norm': f(0.0, 'global-norm clip (0: off)'),
    'b1': f(0.9, 'Adam beta1'),
    'b2': f(0.999, 'Adam beta2'),
    'eps': f(1e-8, 'Adam epsilon'),
    'momentum': f(0.9, 'SGD momentum'),
    'nesterov': f(False, 'SGD Nesterov momentum'),
}
del f


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
  value = config_lib.get(optim_config, key, default)
  return default if value is None else value


def validate_optim_config(optim_config: Any, prefix: str = 'optim') -> None:
  """Raises ValueError naming `optim.<key>` for a bad optimiser config."""
  cfg = {'optim': optim_config}
  config_lib.require(cfg, 'optim.name', allowed=OPTIMIZERS)
  config_lib.require_positive(cfg, 'optim.lr')
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


def accumulated_value_and_grad(loss_fn: Callable[..., Any], params: Any,
                               batch: Any, aux: Any, num_micro: int
                               ) -> tuple[tuple[jax.Array, Any], Any]:
  """`value_and_grad(loss_fn, has_aux=True)` over `num_micro` micro-batches.

  Args:
    loss_fn: (params, micro_batch, aux, index) -> (scalar mean loss, new
      aux); index is the micro-batch number (int32 scalar, e.g. to fold into
      a dropout key); aux is threaded through the micro-batches in order
      (e.g. BatchNorm statistics).
    params: differentiated argument.
    batch: pytree of arrays with a leading batch axis B (B % num_micro ==
      0). Micro-batch i holds rows i, i + n, i + 2n, ... so each device
      keeps its own rows of a batch-sharded array.
    aux: initial aux.
    num_micro: n; 1 is a plain value_and_grad.

  Returns:
    ((mean loss, final aux), mean grads): with equal micro-batches and a
    loss that is a mean over examples, the same update as the full batch
    (float32 sums; tests hold it to 1e-5).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, batch, aux, jnp.zeros((), jnp.int32))

  def split(x):
    b = x.shape[0]
    if b % num_micro:
      raise ValueError(f'batch of {b} does not split into {num_micro} '
                       'micro-batches (grad_accum).')
    x = x.reshape((b // num_micro, num_micro) + x.shape[1:])
    return jnp.moveaxis(x, 1, 0)

  micro = jax.tree.map(split, batch)

  def body(carry, inputs):
    loss_sum, grad_sum, aux = carry
    index, mb = inputs
    (loss, aux), grads = grad_fn(params, mb, aux, index)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    return (loss_sum + loss.astype(jnp.float32),
            jax.tree.map(jnp.add, grad_sum, grads), aux), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (loss_sum, grad_sum, aux), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), zeros, aux),
      (jnp.arange(num_micro, dtype=jnp.int32), micro))
  grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype),
                       grad_sum, params)
  return (loss_sum / num_micro, aux), grads
