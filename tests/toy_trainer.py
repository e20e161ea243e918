"""A tiny test-only trainer and its config (`--config=tests/toy_trainer.py`).

A 2-layer MLP regresses a fixed random linear map on a deterministic numpy
stream whose position is checkpointed. Exercises every infrastructure piece
(mesh, sharded state, optimiser, Checkpointer, MetricWriter, loop.fit) in a
few seconds. Test hooks (environment variables, so that they do not change
the saved config): TOY_SIGKILL_AT_STEP kills the process with SIGKILL when
the batch of that step is drawn.
"""
from __future__ import annotations

import functools
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
from edgevl_jax.run import checkpoint as checkpoint_lib
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import loop
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import metrics as metrics_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import state as state_lib

DIM = 8


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, steps=60, nan_at_step=-1)
  config = ml_collections.ConfigDict()
  config.trainer = 'tests.toy_trainer'
  config.seed = 0
  config.num_steps = args.steps
  config.batch_size = 16
  config.hidden = 32
  config.log_every = 5
  config.ckpt_every = 10
  config.max_to_keep = 2
  config.nan_at_step = args.nan_at_step  # inject NaN into that step's batch
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  config.optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=3e-3, end_lr=1e-4, weight_decay=1e-2,
      grad_clip_norm=1.0, warmup_steps=0))
  return config


def validate_config(config: Any) -> None:
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
      jax.random.PRNGKey(config.seed), mesh=mesh)
  step = mesh_lib.jit_sharded(
      make_train_step(model),
      in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
      out_shardings=(shardings, mesh_lib.replicated(mesh)),
      donate_argnums=(0,))
  return model, state, shardings, step


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  mesh = mesh_lib.make_mesh(config.mesh)
  _, state, _, step = setup(config, mesh)
  stream = NumpyStream(config.seed, config.batch_size, config.nan_at_step)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                     max_to_keep=config.max_to_keep)
  with ckpt, metrics_lib.MetricWriter(workdir, total_steps=config.num_steps,
                                      progress=False) as writer:
    state, summary = loop.fit(
        state, step, stream, num_steps=config.num_steps, checkpointer=ckpt,
        writer=writer, log_every=config.log_every,
        ckpt_every=config.ckpt_every,
        prepare_batch=functools.partial(mesh_lib.shard_batch, mesh=mesh))
  return {'final_loss': summary['loss'], 'steps': int(state.step)}
