"""OFA-KD exit branches: intermediate student features -> logits.

OFA-KD (Hao et al., NeurIPS 2023) sidesteps the feature divergence of
heterogeneous teacher/student pairs by distilling in logit space only: each
chosen student stage gets a small branch that maps its feature to class
logits, trained with `losses.ofa_loss` against the teacher's logits.

* Spatial features (B, H, W, C) (ResNet, MobileNetV2, Swin stages) go
  through `ConvBranch`: depthwise-separable stride-2 blocks down to the final
  stage's resolution, global average pooling, Linear.
* Token features (B, T, C) (ViT stages, CLS first) go through `TokenBranch`:
  optional 2x2 patch merging, a few transformer blocks, the CLS token (or the
  token mean), Linear.

`make_branch(feature_shape, ...)` picks the branch from the feature's rank.
Every conv/matmul goes through `layers.*` with the injected `Ops`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import layers
from edgevl_jax.models.sepconv import SepConv
from edgevl_jax.models.vit import EncoderBlock


class ConvBranch(nn.Module):
  """Exit branch for a (B, H, W, C) stage feature.

  Attributes:
    num_classes: logits width.
    features: channels of the last block (OFA: max(C_student, C_teacher)).
    num_downsamples: stride-2 SepConv blocks (OFA: 4 - stage for stages
      1..3); channels double per block until the last, which has `features`.
      0 means one 1x1 conv to `features` (the last stage).
  """

  num_classes: int
  features: int
  num_downsamples: int
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: (B, H, W, C) -> (B, num_classes) float32 logits."""
    if x.ndim != 4:
      raise ValueError(f"ConvBranch expects (B, H, W, C) features, got shape "
                       f"{x.shape}; use TokenBranch for (B, T, C) tokens.")
    c = x.shape[-1]
    if self.num_downsamples == 0:
      x = layers.conv(self.features, (1, 1), ops=self.ops, dtype=self.dtype,
                      name="proj")(x)
    for i in range(self.num_downsamples):
      last = i == self.num_downsamples - 1
      c = self.features if last else 2 * c
      x = SepConv(c, ops=self.ops, dtype=self.dtype, name=f"down{i}")(
          x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    logits = layers.dense(self.num_classes, ops=self.ops,
                          axes=(layers.EMBED, layers.CLASSES),
                          dtype=self.dtype, name="fc")(x)
    return logits.astype(jnp.float32)


class PatchMerging(nn.Module):
  """Swin-style 2x2 token merging: (B, h*w, C) -> (B, h/2 * w/2, out)."""

  features: int
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, c = x.shape
    side = math.isqrt(n)
    if side * side != n or side % 2:
      raise ValueError(f"PatchMerging needs an even square token grid, got "
                       f"{n} tokens; lower num_merges.")
    x = x.reshape(b, side // 2, 2, side // 2, 2, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, n // 4, 4 * c)
    x = layers.layer_norm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)
    return layers.dense(self.features, ops=self.ops,
                        axes=(layers.MLP, layers.EMBED), use_bias=False,
                        dtype=self.dtype, name="reduction")(x)


class TokenBranch(nn.Module):
  """Exit branch for a (B, T, C) token feature (prefix tokens first).

  Attributes:
    num_classes: logits width.
    width: branch width (OFA: the student's final width).
    num_blocks: transformer blocks (OFA: max(4 - stage, 1)).
    num_merges: 2x2 patch mergings of the patch grid before the blocks.
    num_prefix_tokens: CLS-like tokens kept aside from merging; the first is
      the output token. 0: mean over tokens.
    num_heads: attention heads of the blocks.
  """

  num_classes: int
  width: int
  num_blocks: int = 1
  num_merges: int = 0
  num_prefix_tokens: int = 1
  num_heads: int = 4
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: (B, T, C) -> (B, num_classes) float32 logits."""
    if x.ndim != 3:
      raise ValueError(f"TokenBranch expects (B, T, C) tokens, got shape "
                       f"{x.shape}; use ConvBranch for (B, H, W, C) maps.")
    proj = lambda name: layers.dense(
        self.width, ops=self.ops, axes=(layers.MLP, layers.EMBED),
        dtype=self.dtype, name=name)
    if self.num_merges:
      prefix = x[:, :self.num_prefix_tokens]
      patches = x[:, self.num_prefix_tokens:]
      for i in range(self.num_merges):
        patches = PatchMerging(self.width, self.ops, self.dtype,
                               name=f"merge{i}")(patches)
        if i < self.num_merges - 1:
          patches = nn.gelu(patches, approximate=False)
      if self.num_prefix_tokens and prefix.shape[-1] != self.width:
        prefix = proj("prefix_proj")(prefix)
      x = jnp.concatenate([prefix, patches], axis=1)
    elif x.shape[-1] != self.width:
      x = proj("proj")(x)
    for i in range(self.num_blocks):
      x = EncoderBlock(self.num_heads, 4 * self.width, drop_path=0.0,
                       layer_norm_eps=1e-6, ops=self.ops, dtype=self.dtype,
                       name=f"block{i}")(x, train=train)
    x = layers.layer_norm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    x = x[:, 0] if self.num_prefix_tokens else jnp.mean(x, axis=1)
    logits = layers.dense(self.num_classes, ops=self.ops,
                          axes=(layers.EMBED, layers.CLASSES),
                          dtype=self.dtype, name="fc")(x)
    return logits.astype(jnp.float32)


def make_branch(feature_shape: Sequence[int], *, final_shape: Sequence[int],
                num_classes: int, teacher_width: int = 0, stage: int = 1,
                num_prefix_tokens: int = 1, num_heads: int = 4,
                ops: layers.Ops = layers.Ops(), name: str | None = None
                ) -> nn.Module:
  """The OFA branch for one student stage, sized as in OFA-KD.

  Args:
    feature_shape: (B, H, W, C) or (B, T, C) shape of the stage feature.
    final_shape: shape of the student's last stage (target resolution/width).
    num_classes: logits width.
    teacher_width: teacher's final feature width (conv branches end with
      max(student, teacher) channels); 0 ignores it.
    stage: 1-based stage index; token branches get max(4 - stage, 1) blocks.
    num_prefix_tokens: CLS-like tokens in token features.
    num_heads: attention heads of token-branch blocks.
  """
  if len(feature_shape) == 4:
    if len(final_shape) != 4:
      raise ValueError(f"final_shape must be (B, H, W, C) for spatial "
                       f"features, got {tuple(final_shape)}.")
    ratio = feature_shape[1] / final_shape[1]
    downs = max(int(round(math.log2(ratio))), 0) if ratio > 0 else 0
    return ConvBranch(num_classes, max(final_shape[-1], teacher_width), downs,
                      ops=ops, name=name)
  if len(feature_shape) == 3:
    grid = math.isqrt(feature_shape[1] - num_prefix_tokens)
    final_grid = math.isqrt(final_shape[1] - num_prefix_tokens) if len(
        final_shape) == 3 else grid
    merges = max(int(round(math.log2(grid / max(final_grid, 1)))), 0)
    width = final_shape[-1]
    heads = num_heads if width % num_heads == 0 else 1
    return TokenBranch(num_classes, width, num_blocks=max(4 - stage, 1),
                       num_merges=merges, num_prefix_tokens=num_prefix_tokens,
                       num_heads=heads, ops=ops, name=name)
  raise ValueError(f"OFA branches take (B, H, W, C) or (B, T, C) features, "
                   f"got shape {tuple(feature_shape)}.")


class OFABranches(nn.Module):
  """One branch per chosen stage: stage features -> tuple of logits.

  Attributes:
    stage_shapes: shapes of all student stages (from `method='features'`).
    stages: 1-based stage indices that get a branch (OFA default: 1, 2, 3).
    num_classes, teacher_width, num_prefix_tokens: see `make_branch`.
  """

  stage_shapes: tuple[tuple[int, ...], ...]
  stages: tuple[int, ...]
  num_classes: int
  teacher_width: int = 0
  num_prefix_tokens: int = 1
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, stage_features: Sequence[jax.Array], *,
               train: bool = False) -> tuple[jax.Array, ...]:
    """stage_features: all student stages -> one (B, classes) per branch."""
    if len(stage_features) != len(self.stage_shapes):
      raise ValueError(f"expected {len(self.stage_shapes)} stage features, "
                       f"got {len(stage_features)}.")
    out = []
    for s in self.stages:
      if not 1 <= s <= len(self.stage_shapes):
        raise ValueError(f"OFA stage {s} out of range "
                         f"1..{len(self.stage_shapes)}.")
      branch = make_branch(self.stage_shapes[s - 1],
                           final_shape=self.stage_shapes[-1],
                           num_classes=self.num_classes,
                           teacher_width=self.teacher_width, stage=s,
                           num_prefix_tokens=self.num_prefix_tokens,
                           ops=self.ops, name=f"stage{s}")
      out.append(branch(stage_features[s - 1], train=train))
    return tuple(out)
