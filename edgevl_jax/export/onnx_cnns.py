"""ONNX graphs of the CNN students (ResNet-18/34, MobileNetV2), NCHW.

BatchNorm is folded into the conv before it (`Weights.conv_bn`: the int8
codes are kept, the per-channel weight step absorbs the BN factor). Every
conv input is quantised per tensor at the project's static step.

ONNX Runtime builds an integer QLinearConv only when the conv output is
quantised too. We add that output QuantizeLinear only where it is exactly
the project's next quantiser: a conv whose (ReLU / ReLU6) output feeds one
quantised conv and nothing else, quantised with that conv's calibrated input
step (ReLU and the ReLU6 clip commute with rounding to a symmetric grid, so
Q(act(y)) = act(Q(y)) code for code). A conv whose output also feeds a float
residual add (ResNet's second conv and shortcut, MobileNetV2's linear
reduce, the stems, the last 1x1) keeps a float output: its int8 weights and
quantised input are the same codes, computed in float.
"""
from __future__ import annotations

from edgevl_jax.export.onnx_graph import Graph
from edgevl_jax.export.onnx_weights import Weights
from edgevl_jax.models import mobilenet


def _act(g: Graph, y: str, act: str | None) -> str:
  if act == "relu":
    return g.op("Relu", y)
  if act == "relu6":
    return g.op("Clip", y, g.const(0.0, "zero_f32", "float32"),
                g.const(6.0, "six_f32", "float32"))
  return y


def conv_act(g: Graph, w: Weights, conv: str, bn: str, x: str, *, eps: float,
             strides: int, pads, group: int = 1, act: str | None = None,
             next_conv: str | None = None) -> str:
  """conv -> folded BN -> act; output quantised at `next_conv`'s input step.

  `next_conv` must be the only consumer of the activation (see module doc).
  """
  layer = w.conv_bn(conv, bn, eps)
  y = g.conv(x, layer, strides=strides, pads=pads, group=group)
  if next_conv is not None and layer.quantised:
    y = g.quant(y, w.amax(next_conv))
  return _act(g, y, act)


def _pool(g: Graph, x: str) -> str:
  return g.mean(x, (2, 3))


def resnet(g: Graph, w: Weights, m, x: str, image_size: int) -> str:
  """ResNet backbone: (B, 3, S, S) -> (B, C_4)."""
  del image_size
  eps = m.bn_epsilon
  k, s, p = (3, 1, 1) if m.cifar_stem else (7, 2, 3)
  x = conv_act(g, w, "backbone/stem_conv", "backbone/stem_bn/bn", x, eps=eps,
               strides=s, pads=(p,) * 4, act="relu")
  if not m.cifar_stem:
    x = g.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2],
             pads=[1, 1, 1, 1])
  c_in = m.stem_width
  for si, (blocks, width) in enumerate(zip(m.stage_sizes, m.widths)):
    for j in range(blocks):
      stride = 2 if j == 0 and (si > 0 or m.downsample_in_first_stage) else 1
      b = f"backbone/stage{si}_block{j}"
      y = conv_act(g, w, f"{b}/layer0_conv", f"{b}/layer0_bn/bn", x, eps=eps,
                   strides=stride, pads=(1,) * 4, act="relu",
                   next_conv=f"{b}/layer1_conv")
      y = conv_act(g, w, f"{b}/layer1_conv", f"{b}/layer1_bn/bn", y, eps=eps,
                   strides=1, pads=(1,) * 4)
      shortcut = x
      if stride != 1 or c_in != width:
        shortcut = conv_act(g, w, f"{b}/shortcut_conv", f"{b}/shortcut_bn/bn",
                            x, eps=eps, strides=stride, pads=(0,) * 4)
      x = g.op("Relu", g.op("Add", y, shortcut))
      c_in = width
  return _pool(g, x)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, ...]:
  """TensorFlow 'SAME' pads (top, left, bottom, right) of a square map."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total // 2, total - total // 2, total - total // 2)


def mobilenet_v2(g: Graph, w: Weights, m, x: str, image_size: int) -> str:
  """MobileNetV2 backbone: (B, 3, S, S) -> (B, 1280 * width)."""
  eps = m.bn_epsilon
  size = image_size

  def pads(kernel, stride):
    if m.tf_padding:
      return _same_pads(size, kernel, stride)
    return ((kernel - 1) // 2,) * 4

  def block(path, x, stride, residual):
    nonlocal size
    expand = w.has(f"{path}/expand/bn/bn/mean", "batch_stats")
    y = x
    if expand:
      y = conv_act(g, w, f"{path}/expand/conv", f"{path}/expand/bn/bn", y,
                   eps=eps, strides=1, pads=(0,) * 4, act="relu6",
                   next_conv=f"{path}/depthwise/conv")
    dw = w.layer(f"{path}/depthwise/conv", conv=True)
    groups = (dw.kernel if dw.kernel is not None else dw.codes).shape[0]
    y = conv_act(g, w, f"{path}/depthwise/conv", f"{path}/depthwise/bn/bn", y,
                 eps=eps, strides=stride, pads=pads(3, stride), group=groups,
                 act="relu6", next_conv=f"{path}/reduce/conv")
    size = -(-size // stride) if m.tf_padding else (size - 1) // stride + 1
    y = conv_act(g, w, f"{path}/reduce/conv", f"{path}/reduce/bn/bn", y,
                 eps=eps, strides=1, pads=(0,) * 4)
    return g.op("Add", x, y) if residual else y

  x = conv_act(g, w, "backbone/stem_conv/conv", "backbone/stem_conv/bn/bn", x,
               eps=eps, strides=2, pads=pads(3, 2), act="relu6",
               next_conv="backbone/stem_block/depthwise/conv")
  size = -(-size // 2) if m.tf_padding else (size - 1) // 2 + 1
  x = block("backbone/stem_block", x, 1, False)
  c_in = _out_channels(w, "backbone/stem_block/reduce/conv")
  for i, stride in enumerate(mobilenet.STRIDES):
    path = f"backbone/block{i}"
    c_out = _out_channels(w, f"{path}/reduce/conv")
    x = block(path, x, stride, stride == 1 and c_in == c_out)
    c_in = c_out
  x = conv_act(g, w, "backbone/head_conv/conv", "backbone/head_conv/bn/bn", x,
               eps=eps, strides=1, pads=(0,) * 4, act="relu6")
  return _pool(g, x)


def _out_channels(w: Weights, conv: str) -> int:
  layer = w.layer(conv, conv=True)
  return (layer.kernel if layer.kernel is not None else layer.codes).shape[0]
