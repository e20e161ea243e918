"""Multi-header student with multi-level feature sharing (CDFKD-MFS).

A shared trunk gives stage outputs u1..uN (ResNet-18 with the CIFAR stem:
N = 4, channels 64/128/256/512; a WideResNet: N = 3). Each of the H heads
(one per teacher) aggregates every level:

  a1 = E1(u1); a_k = E_k(concat(u_k, a_{k-1})); f = GAP(a_N);
  logits_h = Linear(f).

E blocks are separable convs (`sepconv.SepConv`: depthwise 3x3 stride 2 ->
1x1 -> BN -> ReLU -> depthwise 3x3 stride 1 -> 1x1 -> BN -> ReLU). E_k maps
to the channels of u_{k+1} (E_N keeps the channels of u_N), which for
ResNet-18 gives the paper's 64->128, 256->256, 512->512, 1024->512. The
prediction is the mean of the head logits.

`AttentionAggregator` is the optional learned combination:
w_h = softmax_h(fc(logits_h)) with one Linear(K -> 1) shared by the heads;
prediction = sum_h w_h * logits_h, per sample.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import layers
from edgevl_jax.models import students
from edgevl_jax.models import wrn
from edgevl_jax.models.sepconv import SepConv


class Head(nn.Module):
  """One head: E blocks over all trunk levels, GAP, Linear(-> classes)."""

  num_classes: int
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, stages: tuple[jax.Array, ...], *, train: bool
               ) -> tuple[jax.Array, jax.Array]:
    """stages: (u1..uN) -> (logits (B, K), pooled feature f (B, C_N))."""
    a = None
    for k, u in enumerate(stages):
      x = u if a is None else jnp.concatenate([u, a], axis=-1)
      out = stages[min(k + 1, len(stages) - 1)].shape[-1]
      a = SepConv(out, ops=self.ops, dtype=self.dtype, name=f"E{k + 1}")(
          x, train=train)
    f = jnp.mean(a, axis=(1, 2))
    logits = layers.dense(self.num_classes, ops=self.ops,
                          axes=(layers.EMBED, layers.CLASSES),
                          dtype=self.dtype, name="fc")(f)
    return logits, f


class MultiHeadStudent(nn.Module):
  """Shared trunk + H multi-level heads.

  Attributes:
    trunk: a backbone returning {'stages': (u1..uN), ...} from
      `trunk(images, train=...)` (e.g. `resnet.ResNet`, `wrn.WideResNet`).
    num_heads: H, the number of teachers.
    num_classes: K.
  """

  trunk: nn.Module
  num_heads: int
  num_classes: int
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False
               ) -> dict[str, jax.Array]:
    """images (B, H, W, 3) -> dict.

    Returns:
      logits: (B, K) mean of the head logits (the prediction);
      head_logits: (H, B, K); head_features: (H, B, C_N) pooled features.
    """
    stages = tuple(self.trunk(images, train=train)["stages"])
    outs = [Head(self.num_classes, ops=self.ops, dtype=self.dtype,
                 name=f"head{h}")(stages, train=train)
            for h in range(self.num_heads)]
    head_logits = jnp.stack([o[0] for o in outs])
    return {"logits": jnp.mean(head_logits, axis=0),
            "head_logits": head_logits,
            "head_features": jnp.stack([o[1] for o in outs])}


class AttentionAggregator(nn.Module):
  """w_h = softmax_h(fc(logits_h)); prediction = sum_h w_h logits_h.

  Attributes:
    ops: injected ops for the shared Linear(K -> 1).
  """

  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, head_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """head_logits (H, B, K) -> (logits (B, K), weights (H, B))."""
    if head_logits.ndim != 3:
      raise ValueError(
          "AttentionAggregator expects head logits of shape (heads, batch, "
          f"classes); found {tuple(head_logits.shape)}.")
    scores = layers.dense(1, ops=self.ops, axes=(layers.CLASSES, None),
                          name="fc")(head_logits)[..., 0]
    weights = jax.nn.softmax(scores, axis=0)
    return jnp.einsum("hb,hbk->bk", weights, head_logits), weights


def build(trunk: str = "resnet18", *, num_heads: int, num_classes: int,
          quant: Any = None, **trunk_overrides: Any) -> MultiHeadStudent:
  """The multi-header student on a named trunk.

  Args:
    trunk: 'resnet18' / 'resnet34' (CIFAR stem unless overridden) or
      'wrn' (`wrn.WideResNet`, e.g. depth=16, widen_factor=2).
    num_heads: H (number of teachers).
    num_classes: K.
    quant: as in `students.build`.
    **trunk_overrides: trunk fields, e.g. widths=(16, 32, 64, 128).
  """
  if num_heads < 1 or num_classes < 2:
    raise ValueError(
        f"multihead.build needs num_heads >= 1 and num_classes >= 2; found "
        f"num_heads={num_heads}, num_classes={num_classes}.")
  ops = layers.Ops() if quant is None else quant.ops()
  if trunk == "wrn":
    backbone = wrn.WideResNet(ops=ops, **trunk_overrides)
  else:
    settings = {"cifar_stem": True, "image_size": 32, **trunk_overrides}
    backbone = students.build(trunk, embed_dim=None, quant=quant,
                              **settings).backbone
  return MultiHeadStudent(backbone, num_heads, num_classes, ops=ops)
