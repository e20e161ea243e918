"""Projection heads from a student backbone into the teacher's embedding space.

EdgeVL maps the backbone's pooled feature to the CLIP embedding size D:
  Swin: final norm, average pool (in the backbone), Linear(-> D), LayerNorm(D).
  ViT: mean pool over all final-LayerNorm tokens incl. CLS (in the backbone),
    Linear(-> D), no LayerNorm.
  CNNs (ResNet, MobileNetV2): global average pool (in the backbone),
    Linear(-> D). The paper has no CNN students; this mirrors the ViT head.

Also holds `check_images`, the input check every student backbone shares.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import layers


def check_images(
    images: jax.Array,
    model: str,
    *,
    size: tuple[int, int] | None = None,
    multiple: int | None = None,
) -> None:
  """Raises a ValueError unless `images` is an NHWC 3-channel batch.

  Args:
    images: (B, H, W, 3) array.
    model: model name for the message.
    size: the only accepted (H, W), if the model has a fixed size.
    multiple: H and W must be multiples of this, if given.
  """
  shape = tuple(images.shape)
  want = (f"(B, {size[0]}, {size[1]}, 3)" if size else
          f"(B, H, W, 3) with H and W multiples of {multiple}" if multiple
          else "(B, H, W, 3)")
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(
        f"{model} expects NHWC RGB images of shape {want}, got {shape}; "
        "repeat single-channel modalities to 3 channels and put channels "
        "last.")
  if size is not None and shape[1:3] != tuple(size):
    raise ValueError(
        f"{model} expects images of shape {want}, got {shape}; resize the "
        "input or build the model with image_size matching the data.")
  if multiple and (shape[1] % multiple or shape[2] % multiple):
    raise ValueError(f"{model} expects images of shape {want}, got {shape}.")


class ProjectionHead(nn.Module):
  """Linear(-> embed_dim), optionally followed by LayerNorm(embed_dim).

  Attributes:
    embed_dim: D, the teacher embedding size.
    layer_norm: True for Swin (EdgeVL's Swin head), False for ViT and CNNs.
    layer_norm_eps: epsilon of that LayerNorm (PyTorch default 1e-5).
  """

  embed_dim: int
  layer_norm: bool = False
  layer_norm_eps: float = 1e-5
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    """pooled: (B, C) -> (B, embed_dim), unnormalised."""
    x = layers.dense(self.embed_dim, ops=self.ops,
                     axes=(layers.EMBED, layers.CLASSES), dtype=self.dtype,
                     name="proj")(pooled)
    if self.layer_norm:
      x = layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                            name="norm")(x)
    return x
