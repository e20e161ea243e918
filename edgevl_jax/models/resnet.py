"""ResNet-18/34 backbone (He et al., CVPR 2016) with basic residual blocks.

Two stems: the ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) and the
CIFAR stem (3x3/1 conv, BN, ReLU, no pool) used for 32x32 inputs, e.g. by the
data-free distillation students, which reuse this trunk through its stage
outputs u1..u4. Padding is PyTorch's symmetric k // 2, so ImageNet
checkpoints (Hugging Face `ResNetModel`: `from_hf_config`, `HF_MAPPING`
below) give the same numbers. Every BatchNorm is `layers.BatchNorm`, which
sows its input moments for the data-free BN-statistics loss.

Output of `ResNet.__call__(images, train)`: a dict with
  stages: (u1, u2, u3, u4), the outputs of layer1..layer4, (B, H_i, W_i, C_i)
    with strides 4, 8, 16, 32 (ImageNet stem) or 1, 2, 4, 8 (CIFAR stem);
  pooled: (B, C_4) global average pool of u4.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import hf_io
from edgevl_jax.models import hf_mapping
from edgevl_jax.models import layers
from edgevl_jax.models.heads import check_images


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers and an identity or 1x1 conv-BN shortcut.

  Attributes:
    features: output channels.
    strides: stride of the first conv and of the shortcut.
  """

  features: int
  strides: int = 1
  bn_epsilon: float = 1e-5
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / strides, W / strides, features)."""
    def conv_bn(y, features, kernel, strides, pad, name):
      y = layers.conv(features, (kernel, kernel), ops=self.ops,
                      strides=strides, padding=((pad, pad), (pad, pad)),
                      use_bias=False, dtype=self.dtype,
                      kernel_init=layers.conv_init, name=f"{name}_conv")(y)
      return layers.BatchNorm(epsilon=self.bn_epsilon, dtype=self.dtype,
                              name=f"{name}_bn")(
                                  y, use_running_average=not train)

    y = nn.relu(conv_bn(x, self.features, 3, self.strides, 1, "layer0"))
    y = conv_bn(y, self.features, 3, 1, 1, "layer1")
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv_bn(x, self.features, 1, self.strides, 0, "shortcut")
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet backbone. ResNet-18: stage_sizes (2, 2, 2, 2); 34: (3, 4, 6, 3).

  Attributes:
    image_size: nominal input side (used to build init inputs); any H, W
      that are multiples of 32 (ImageNet stem) or 8 (CIFAR stem) work.
    stage_sizes: basic blocks per stage.
    widths: channels per stage.
    stem_width: channels of the stem conv.
    cifar_stem: 3x3/1 stem without max-pool instead of 7x7/2 + max-pool.
    downsample_in_first_stage: stride 2 in layer1 (False in ResNet).
    bn_epsilon: BatchNorm epsilon.
  """

  image_size: int = 224
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  cifar_stem: bool = False
  downsample_in_first_stage: bool = False
  bn_epsilon: float = 1e-5
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    """images: (B, H, W, 3) -> {'stages': (u1, u2, u3, u4), 'pooled'}."""
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(
          f"stage_sizes {tuple(self.stage_sizes)} and widths "
          f"{tuple(self.widths)} must have one entry per stage.")
    check_images(images, "ResNet")
    kernel, stride, pad = (3, 1, 1) if self.cifar_stem else (7, 2, 3)
    x = layers.conv(self.stem_width, (kernel, kernel), ops=self.ops,
                    strides=stride, padding=((pad, pad), (pad, pad)),
                    use_bias=False, dtype=self.dtype,
                    kernel_init=layers.conv_init,
                    name="stem_conv")(images.astype(self.dtype))
    x = layers.BatchNorm(epsilon=self.bn_epsilon, dtype=self.dtype,
                         name="stem_bn")(x, use_running_average=not train)
    x = nn.relu(x)
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stages = []
    for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(blocks):
        first_stride = 2 if (s > 0 or self.downsample_in_first_stage) else 1
        x = BasicBlock(width, first_stride if j == 0 else 1, self.bn_epsilon,
                       self.ops, self.dtype, name=f"stage{s}_block{j}")(
                           x, train=train)
      stages.append(x)
    return {"stages": tuple(stages), "pooled": jnp.mean(x, axis=(1, 2))}


# Hugging Face ResNetModel / ResNetForImageClassification (basic blocks).

# Student field -> ResNetConfig key, where the names differ.
HF_FIELDS = {"stage_sizes": "depths", "widths": "hidden_sizes",
             "stem_width": "embedding_size"}

_BLOCK, _HF_BLOCK = r"stage(\d+)_block(\d+)", r"encoder.stages.\1.layers.\2"
HF_MAPPING = hf_mapping.StudentMapping(
    model_type="resnet", prefix="resnet.",
    rules=(
        (r"stem_conv", "embedder.embedder.convolution"),
        (r"stem_bn/bn", "embedder.embedder.normalization"),
        (rf"{_BLOCK}/layer(\d)_conv", rf"{_HF_BLOCK}.layer.\3.convolution"),
        (rf"{_BLOCK}/layer(\d)_bn/bn", rf"{_HF_BLOCK}.layer.\3.normalization"),
        (rf"{_BLOCK}/shortcut_conv", rf"{_HF_BLOCK}.shortcut.convolution"),
        (rf"{_BLOCK}/shortcut_bn/bn", rf"{_HF_BLOCK}.shortcut.normalization"),
    ))


def from_hf_config(cfg: dict[str, Any], path: str = "") -> dict[str, Any]:
  """`ResNet` fields from a ResNetConfig dict (KeyError names an absent key)."""
  hf_io.require_values(cfg, path, num_channels=(3,), layer_type=("basic",),
                       hidden_act=("relu",))
  return dict(stage_sizes=tuple(cfg["depths"]),
              widths=tuple(cfg["hidden_sizes"]),
              stem_width=cfg["embedding_size"],
              downsample_in_first_stage=cfg.get(
                  "downsample_in_first_stage", False))
