"""The frozen teachers of data-free distillation (classifier job outputs).

Teachers must share one architecture (the paper's three ResNet-34s), so
their variables are stacked along a leading axis H and run in one trace.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax import classification as cls
from edgevl_jax import losses
from edgevl_jax.models import layers


def load_teachers(teachers_dir: str) -> tuple[nn.Module, Any, list[str]]:
  """The classifier stage's models: (model, stacked variables (H, ...), dirs).

  Teachers must share one architecture (the paper's three ResNet-34s), so
  their variables are stacked (leading axis H).
  """
  dirs = sorted(glob.glob(os.path.join(teachers_dir, "model_*")))
  if not dirs:
    raise ValueError(f"No teacher folders model_* in {teachers_dir!r}; point "
                     "config.teachers_dir at a finished classifier-job workdir.")
  loaded = [cls.load_classifier(d) for d in dirs]
  shapes = [jax.tree.map(np.shape, v) for _, v in loaded]
  if any(s != shapes[0] for s in shapes[1:]):
    raise ValueError(f"Teachers in {teachers_dir!r} have different "
                     "architectures; train them with one model config.")
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *[v for _, v in loaded])
  return loaded[0][0], stacked, dirs


def teachers_forward(model: nn.Module, stacked: Any, images: jax.Array, *,
                     bn_first_weight: float | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """All teachers in inference mode: logits (H, B, K), pooled (H, B, C).

  With `bn_first_weight`, also each teacher's BN-statistics loss (H,), from
  the input moments sown by every `layers.BatchNorm` (computed in the same
  trace as the apply, which keeps the sown layers in execution order).
  """
  def one(variables):
    if bn_first_weight is None:
      logits, pooled = cls.logits_and_features(model, variables, images)
      return logits, pooled, jnp.zeros(())
    (logits, pooled), mutated = cls.logits_and_features(
        model, variables, images, mutable=[layers.BN_STATS])
    batch, running = losses.teacher_bn_moments(
        mutated[layers.BN_STATS], variables["batch_stats"])
    bn = losses.bn_statistics_loss(batch_moments=batch,
                                   running_moments=running,
                                   first_layer_weight=bn_first_weight)
    return logits, pooled, bn
  # An unrolled loop, not jax.vmap: vmapping a conv over both weights and
  # activations lowers to a grouped conv, which XLA:CPU runs ~5-10x slower
  # than H plain convs (lax.map is as fast forward but ~10x slower to
  # differentiate, which the generator step does).
  n = jax.tree.leaves(stacked)[0].shape[0]
  outs = [one(jax.tree.map(lambda v: v[i], stacked)) for i in range(n)]
  return tuple(jnp.stack(o) for o in zip(*outs))
