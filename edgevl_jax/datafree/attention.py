"""Attention aggregation of the student's heads (CDFKD-MFS, last step).

With the student frozen, a small attention module (models.multihead) learns
to weigh the heads' logits on a few real training samples.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from edgevl_jax import classification as cls
from edgevl_jax.models import multihead


def fit_attention(config: Any, head_logits_train: np.ndarray,
               labels: np.ndarray, head_logits_test: np.ndarray,
               test_labels: np.ndarray) -> tuple[float, int]:
  """Fits the attention aggregation on a few real samples; test accuracy."""
  fraction = float(config.attention.fraction)
  n = len(labels)
  picked = np.random.default_rng(config.seed).permutation(n)[
      :max(1, int(round(fraction * n)))]
  x, y = jnp.asarray(head_logits_train[:, picked]), jnp.asarray(labels[picked])
  agg = multihead.AttentionAggregator()
  params = nn.unbox(agg.init(jax.random.key(config.seed), x))["params"]
  tx = optax.adam(float(config.attention.lr))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      logits, _ = agg.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  for _ in range(int(config.attention.steps)):
    params, opt = step(params, opt)
  logits, _ = agg.apply({"params": params}, jnp.asarray(head_logits_test))
  return cls.accuracy(np.asarray(logits), test_labels), len(picked)
