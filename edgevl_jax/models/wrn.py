"""Wide ResNet for 32 x 32 images (Zagoruyko & Komodakis, BMVC 2016).

WRN-depth-k: a 3x3 conv to 16 channels, three groups of (depth - 4) / 6
pre-activation basic blocks with 16k, 32k, 64k channels (strides 1, 2, 2),
then BN-ReLU. Used as an alternative trunk of the multi-header data-free
student (WRN-16-2, WRN-40-2 in the CDFKD literature).

Output of `WideResNet.__call__(images, train)`: {'stages': (u1, u2, u3),
'pooled': (B, 64k)}; u3 is taken after the final BN-ReLU.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import layers
from edgevl_jax.models.heads import check_images


class WideBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut."""

  features: int
  strides: int = 1
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / strides, W / strides, features)."""
    conv = lambda f, k, s, name: layers.conv(
        f, (k, k), ops=self.ops, strides=s, padding=((k // 2, k // 2),) * 2,
        use_bias=False, kernel_init=layers.conv_init, name=name)
    act = nn.relu(layers.BatchNorm(name="bn0")(
        x, use_running_average=not train))
    y = conv(self.features, 3, self.strides, "conv0")(act)
    y = nn.relu(layers.BatchNorm(name="bn1")(y, use_running_average=not train))
    y = conv(self.features, 3, 1, "conv1")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, "shortcut")(act)
    return x + y


class WideResNet(nn.Module):
  """WRN-depth-widen_factor trunk.

  Attributes:
    depth: total depth, 6n + 4 (16, 28, 40, ...).
    widen_factor: k.
    image_size: nominal input side (for init inputs).
  """

  depth: int = 16
  widen_factor: int = 2
  image_size: int = 32
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False
               ) -> dict[str, Any]:
    """images (B, H, W, 3) -> {'stages': (u1, u2, u3), 'pooled'}."""
    if (self.depth - 4) % 6:
      raise ValueError(
          f"WideResNet depth must be 6n + 4 (16, 22, 28, 40); found "
          f"{self.depth}.")
    check_images(images, "WideResNet", multiple=4)
    n = (self.depth - 4) // 6
    x = layers.conv(16, (3, 3), ops=self.ops, padding=((1, 1), (1, 1)),
                    use_bias=False, kernel_init=layers.conv_init,
                    name="stem_conv")(images)
    stages = []
    for g, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
      for j in range(n):
        x = WideBlock(width * self.widen_factor, stride if j == 0 else 1,
                      ops=self.ops, name=f"group{g}_block{j}")(x, train=train)
      stages.append(x)
    x = nn.relu(layers.BatchNorm(name="final_bn")(
        x, use_running_average=not train))
    stages[-1] = x
    return {"stages": tuple(stages), "pooled": jnp.mean(x, axis=(1, 2))}
