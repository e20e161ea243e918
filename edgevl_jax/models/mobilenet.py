"""MobileNetV2 backbone (Sandler et al., CVPR 2018): inverted residuals, ReLU6.

Block numbering follows torchvision's `features`: features[0] is the stem
conv, features[1] the first (expansion-free) inverted residual, features[2..17]
the 16 inverted residuals `block0..block15` and features[18] the final 1x1
conv. Padding defaults to TensorFlow 'SAME' and BatchNorm epsilon to 1e-3, the
settings of the Google ImageNet checkpoints on the Hugging Face hub
(`tf_padding=True`, `layer_norm_eps=0.001`); `tf_padding=False` gives
PyTorch's symmetric padding. Hugging Face `MobileNetV2Model` checkpoints
convert one to one (`from_hf_config`, `HF_MAPPING` below).

Output of `MobileNetV2.__call__(images, train)`: a dict with
  stages: outputs of features[2], [5], [12], [17] (the OFA-KD CKA blocks),
    (B, H/4, W/4, 24), (B, H/8, W/8, 32), (B, H/16, W/16, 96),
    (B, H/32, W/32, 320) at width 1.0;
  pooled: (B, 1280) global average pool of the final 1x1 conv.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import hf_io
from edgevl_jax.models import hf_mapping
from edgevl_jax.models import layers
from edgevl_jax.models.heads import check_images

# (output channels, stride) of the 16 inverted residuals block0..block15.
CHANNELS = (24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320)
STRIDES = (2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)
# block indices of torchvision features[2], [5], [12], [17].
STAGE_BLOCKS = (0, 3, 10, 15)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None
                   ) -> int:
  """Nearest multiple of `divisor` not below 90% of `value` (TF rule)."""
  min_value = divisor if min_value is None else min_value
  new = max(min_value, int(value + divisor / 2) // divisor * divisor)
  return int(new + divisor if new < 0.9 * value else new)


class ConvBN(nn.Module):
  """Conv (no bias), BatchNorm, optional ReLU6."""

  features: int
  kernel: int = 1
  strides: int = 1
  groups: int = 1
  activation: bool = True
  tf_padding: bool = True
  bn_epsilon: float = 1e-3
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    pad = (self.kernel - 1) // 2
    x = layers.conv(
        self.features, (self.kernel, self.kernel), ops=self.ops,
        strides=self.strides,
        padding="SAME" if self.tf_padding else ((pad, pad), (pad, pad)),
        feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
        kernel_init=layers.conv_init, name="conv")(x)
    x = layers.BatchNorm(epsilon=self.bn_epsilon, dtype=self.dtype,
                         name="bn")(x, use_running_average=not train)
    return jnp.clip(x, 0.0, 6.0) if self.activation else x


class InvertedResidual(nn.Module):
  """1x1 expand, 3x3 depthwise, 1x1 linear reduce; residual when shapes match.

  `expanded == 0` drops the expansion (features[1], the stem's block).
  `residual=False` drops the skip even when shapes match: the stem's block
  has none in the TF/HF model (torchvision adds one when width makes the
  channel counts equal, e.g. width 0.25).
  """

  features: int
  expanded: int
  strides: int
  residual: bool = True
  tf_padding: bool = True
  bn_epsilon: float = 1e-3
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, C) -> (B, H / strides, W / strides, features)."""
    kw = dict(tf_padding=self.tf_padding, bn_epsilon=self.bn_epsilon,
              ops=self.ops, dtype=self.dtype)
    y = x
    if self.expanded:
      y = ConvBN(self.expanded, 1, name="expand", **kw)(y, train=train)
    c = y.shape[-1]
    y = ConvBN(c, 3, self.strides, groups=c, name="depthwise", **kw)(
        y, train=train)
    y = ConvBN(self.features, 1, activation=False, name="reduce", **kw)(
        y, train=train)
    if self.residual and self.strides == 1 and x.shape[-1] == self.features:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 backbone.

  Attributes:
    image_size: nominal input side (used to build init inputs); any H, W
      that are multiples of 32 work.
    width: channel multiplier (1.0).
    divisor, min_depth: channels are rounded to multiples of `divisor`, at
      least `min_depth`.
    expand_ratio: expansion of the inverted residuals (6).
    finegrained_output: keep 1280 final channels when width < 1.
    tf_padding: TensorFlow 'SAME' padding (else PyTorch symmetric).
    bn_epsilon: BatchNorm epsilon.
  """

  image_size: int = 224
  width: float = 1.0
  divisor: int = 8
  min_depth: int = 8
  expand_ratio: float = 6.0
  finegrained_output: bool = True
  tf_padding: bool = True
  bn_epsilon: float = 1e-3
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  def channels(self, c: int) -> int:
    """Channels of a width-1.0 layer with `c` channels at this width."""
    return make_divisible(int(round(c * self.width)), self.divisor,
                          self.min_depth)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    """images: (B, H, W, 3) -> {'stages', 'pooled'}."""
    check_images(images, "MobileNetV2")
    kw = dict(tf_padding=self.tf_padding, bn_epsilon=self.bn_epsilon,
              ops=self.ops, dtype=self.dtype)
    stem = self.channels(32)
    x = ConvBN(stem, 3, 2, name="stem_conv", **kw)(
        images.astype(self.dtype), train=train)
    x = InvertedResidual(self.channels(16), 0, 1, residual=False,
                         name="stem_block", **kw)(x, train=train)
    stages = []
    for i, (c, s) in enumerate(zip(CHANNELS, STRIDES)):
      expanded = make_divisible(int(round(x.shape[-1] * self.expand_ratio)),
                                self.divisor, self.min_depth)
      x = InvertedResidual(self.channels(c), expanded, s, name=f"block{i}",
                           **kw)(x, train=train)
      if i in STAGE_BLOCKS:
        stages.append(x)
    out = (1280 if self.finegrained_output and self.width < 1.0
           else self.channels(1280))
    x = ConvBN(out, 1, name="head_conv", **kw)(x, train=train)
    return {"stages": tuple(stages), "pooled": jnp.mean(x, axis=(1, 2))}


# Hugging Face MobileNetV2Model / MobileNetV2ForImageClassification.

# Student field -> MobileNetV2Config key, where the names differ.
HF_FIELDS = {"width": "depth_multiplier", "divisor": "depth_divisible_by",
             "bn_epsilon": "layer_norm_eps"}

HF_MAPPING = hf_mapping.StudentMapping(
    model_type="mobilenet_v2", prefix="mobilenet_v2.",
    rules=tuple(
        (f"{module}/{child}", f"{hf}.{hf_child}")
        for module, hf in (
            (r"stem_conv", "conv_stem.first_conv"),
            (r"stem_block/depthwise", "conv_stem.conv_3x3"),
            (r"stem_block/reduce", "conv_stem.reduce_1x1"),
            (r"block(\d+)/expand", r"layer.\1.expand_1x1"),
            (r"block(\d+)/depthwise", r"layer.\1.conv_3x3"),
            (r"block(\d+)/reduce", r"layer.\1.reduce_1x1"),
            (r"head_conv", "conv_1x1"))
        for child, hf_child in (("conv", "convolution"),
                                ("bn/bn", "normalization"))))


def from_hf_config(cfg: dict[str, Any], path: str = "") -> dict[str, Any]:
  """`MobileNetV2` fields from a MobileNetV2Config dict (KeyError names an
  absent key)."""
  hf_io.require_values(cfg, path, num_channels=(3,), hidden_act=("relu6",),
                       output_stride=(32,), first_layer_is_expansion=(True,))
  return dict(image_size=hf_io.square_size(cfg, "image_size", path),
              width=cfg["depth_multiplier"],
              divisor=cfg["depth_divisible_by"], min_depth=cfg["min_depth"],
              expand_ratio=cfg["expand_ratio"],
              finegrained_output=cfg["finegrained_output"],
              tf_padding=cfg["tf_padding"], bn_epsilon=cfg["layer_norm_eps"])
