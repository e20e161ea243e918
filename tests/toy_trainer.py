"""A tiny test-only job and its config (`--config=tests/toy_trainer.py`).

A 2-layer MLP regresses a fixed random linear map on a deterministic numpy
stream whose position is checkpointed. A job like the real ones (defaults()
+ build() -> TrainSpec), so it exercises the runner (mesh, sharded state,
optimiser, Checkpointer, MetricWriter, loop.fit) in a few seconds. Test hooks (environment variables, so that they do not change
the saved config): TOY_SIGKILL_AT_STEP kills the process with SIGKILL when
the batch of that step is drawn.
"""
from __future__ import annotations

import os
import signal
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from edgevl_jax.models import layers
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import registry
from edgevl_jax.run import runner
from edgevl_jax.run import state as state_lib

DIM = 8


def defaults() -> config_lib.Schema:
  f = config_lib.field
  return {'batch_size': f(16, 'examples per step'),
          'hidden': f(32, 'hidden width'),
          'num_steps': f(60, 'optimiser steps'),
          'nan_at_step': f(-1, 'inject NaN into that step\'s batch'),
          'optim': optim_lib.OPTIM_SCHEMA}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, steps=60, nan_at_step=-1)
  return registry.job_config(
      'tests.toy_trainer', num_steps=args.steps, log_every=5, ckpt_every=10,
      max_to_keep=2, nan_at_step=args.nan_at_step, progress=False,
      optim=dict(name='adamw', lr=3e-3, end_lr=1e-4, weight_decay=1e-2,
                 grad_clip_norm=1.0, warmup_steps=0))


def validate(config: Any) -> None:
  config_lib.require_positive(config, 'num_steps', integer=True)
  config_lib.require_positive(config, 'batch_size', integer=True)
  config_lib.require_positive(config, 'hidden', integer=True)
  optim_lib.validate_optim_config(config.optim)


class ToyModel(nn.Module):
  """x (B, DIM) -> (B, DIM) through a LayerNorm'ed hidden layer."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ops = layers.Ops()
    h = layers.dense(self.hidden, ops=ops, axes=(layers.EMBED, layers.MLP))(x)
    h = nn.gelu(layers.layer_norm(epsilon=1e-5)(h))
    h = nn.Dropout(0.1)(h, deterministic=False)
    return layers.dense(DIM, ops=ops, axes=(layers.MLP, layers.EMBED))(h)


class NumpyStream:
  """Deterministic batches; `get_state`/`set_state` make it checkpointable."""

  def __init__(self, seed: int, batch_size: int, nan_at_step: int = -1):
    self.seed, self.batch_size, self.nan_at_step = seed, batch_size, nan_at_step
    self.index = 0
    self.target = np.random.default_rng(seed).normal(size=(DIM, DIM))

  def get_state(self) -> dict[str, int]:
    return {'index': self.index}

  def set_state(self, state: dict[str, int]) -> None:
    self.index = int(state['index'])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    kill_at = int(os.environ.get('TOY_SIGKILL_AT_STEP', '-1'))
    if self.index + 1 == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    rng = np.random.default_rng([self.seed, self.index])
    x = rng.normal(size=(self.batch_size, DIM)).astype(np.float32)
    if self.index + 1 == self.nan_at_step:
      x[0, 0] = np.nan
    self.index += 1
    # Each process feeds its slice of the global batch (see shard_batch).
    n, i = jax.process_count(), jax.process_index()
    x = x[i * len(x) // n:(i + 1) * len(x) // n]
    return {'x': x, 'y': (x @ self.target).astype(np.float32)}


def make_train_step(model: ToyModel):
  def train_step(state, batch):
    def loss_fn(params):
      pred = model.apply({'params': params}, batch['x'],
                         rngs={'dropout': state.step_key('dropout')})
      return jnp.mean(jnp.square(pred - batch['y']))
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {'loss': loss,
                                          'grad_norm': optax.global_norm(grads)}
  return train_step


def setup(config: Any, mesh: jax.sharding.Mesh):
  """(model, state, shardings, jitted train step) for `config` on `mesh`."""
  model = ToyModel(config.hidden)
  tx = optim_lib.make_optimizer(config.optim, config.num_steps)
  state, shardings = state_lib.create_train_state(
      lambda k: model.init(k, jnp.zeros((1, DIM))), tx,
      jax.random.key(config.seed), mesh=mesh)
  step = mesh_lib.jit_sharded(
      make_train_step(model),
      in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
      out_shardings=(shardings, mesh_lib.replicated(mesh)),
      donate_argnums=(0,))
  return model, state, shardings, step


def build(config: Any, ctx: runner.Context) -> runner.TrainSpec:
  model = ToyModel(config.hidden)
  return runner.TrainSpec(
      init=lambda k: model.init(k, jnp.zeros((1, DIM))),
      step=make_train_step(model), num_steps=config.num_steps,
      batches=NumpyStream(config.seed, config.batch_size, config.nan_at_step),
      report=lambda state, summary: {'final_loss': summary['loss'],
                                     'steps': int(state.step)})


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the job in this process, as `main.run` does (no lock, no
  config.json)."""
  job, config = registry.validate(config)
  return runner.execute(job, runner.Context(workdir, config))
