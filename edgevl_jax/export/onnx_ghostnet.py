"""ONNX graph of the GhostNetV3 student (the folded `deploy=True` model), NCHW.

The served student is the re-parameterised model (`ghostnet.reparameterize`
before calibration), so every ghost module is two convs with bias
(`primary_conv`, depthwise `cheap_operation`) and a stride-2 bottleneck has
one depthwise `conv_dw`. The BatchNorms outside those folds (stem, DFC
attention, conv shortcut, final 1x1) are folded here into the conv before
them (`Weights.conv_bn`, as onnx_cnns.py).

Output quantisers follow onnx_cnns.py: a conv's output is quantised only
where it feeds one quantised conv and nothing else, at that conv's input
step (the DFC attention's 1x1 -> 1x5 -> 5x1 chain, the shortcut's depthwise
-> 1x1, SE's reduce -> ReLU -> expand). A ghost module's primary conv feeds
both its cheap conv and the concatenation, so it keeps a float output.

SE (mean, 1x1, ReLU, 1x1, clip(s + 3, 0, 6) / 6) and the DFC attention
(2x2 average pool, three conv-BN, sigmoid, nearest upsampling by index, as
torch's F.interpolate) are written op for op as models/ghostnet.py.
"""
from __future__ import annotations

import math

import numpy as np

from edgevl_jax.export.onnx_cnns import conv_act
from edgevl_jax.export.onnx_graph import Graph
from edgevl_jax.export.onnx_weights import Weights
from edgevl_jax.models import ghostnet
from edgevl_jax.models.mobilenet import make_divisible

EPS = ghostnet.BN_EPS


def _pads(kh: int, kw: int) -> tuple[int, int, int, int]:
  """torch's symmetric k // 2 padding as (top, left, bottom, right)."""
  return (kh // 2, kw // 2, kh // 2, kw // 2)


def _conv(g: Graph, w: Weights, path: str, x: str, *, kernel=(1, 1),
          strides: int = 1, group: int = 1) -> str:
  """A conv with its own bias (a folded one), no BatchNorm."""
  return g.conv(x, w.layer(path, conv=True), strides=strides,
                pads=_pads(*kernel), group=group)


def _ghost(g: Graph, w: Weights, path: str, x: str, size: int, *,
           features: int, relu: bool, dfc: bool, dw_size: int = 3) -> str:
  """GhostModule (deploy): (B, C, size, size) -> (B, features, size, size)."""
  init = math.ceil(features / 2)
  act = (lambda y: g.op("Relu", y)) if relu else (lambda y: y)
  x1 = act(_conv(g, w, f"{path}/primary_conv", x))
  x2 = act(_conv(g, w, f"{path}/cheap_operation", x1,
                 kernel=(dw_size, dw_size), group=init))
  out = g.op("Concat", x1, x2, axis=1)
  if not dfc:
    return out
  if size < 2:
    raise ValueError(
        f"GhostNetV3's DFC attention pools a {size}x{size} map by 2; the "
        "student needs images of at least 64x64.")
  res = g.op("AveragePool", x, kernel_shape=[2, 2], strides=[2, 2])
  convs = (((1, 1), 1), ((1, 5), features), ((5, 1), features))
  for i, (kernel, groups) in enumerate(convs):
    nxt = f"{path}/short_conv_{2 * i + 2}" if i + 1 < len(convs) else None
    res = conv_act(g, w, f"{path}/short_conv_{2 * i}",
                   f"{path}/short_conv_{2 * i + 1}/bn", res, eps=EPS,
                   strides=1, pads=_pads(*kernel), group=groups,
                   next_conv=nxt)
  gate = g.op("Sigmoid", res)
  pooled = size // 2  # avg_pool VALID: floor
  # Nearest upsampling as ghostnet._nearest (rows, then columns).
  idx = g.const(ghostnet._nearest(pooled, size).astype(np.int64))  # pylint: disable=protected-access
  gate = g.op("Gather", g.op("Gather", gate, idx, axis=2), idx, axis=3)
  if 2 * init != features:
    out = g.slice(out, [0], [features], [1])
  return g.op("Mul", out, gate)


def _se(g: Graph, w: Weights, path: str, x: str) -> str:
  """SqueezeExcite: x * clip(expand(relu(reduce(mean(x)))) + 3, 0, 6) / 6."""
  s = g.op("ReduceMean", x, g.ints([2, 3]), keepdims=1)
  reduce = w.layer(f"{path}/conv_reduce", conv=True)
  s = g.conv(s, reduce, strides=1, pads=(0,) * 4)
  if reduce.quantised:
    s = g.quant(s, w.amax(f"{path}/conv_expand"))
  s = g.op("Relu", s)
  s = _conv(g, w, f"{path}/conv_expand", s)
  s = g.op("Clip", g.op("Add", s, g.const(np.float32(3.0), "three_f32")),
           g.const(0.0, "zero_f32", "float32"),
           g.const(6.0, "six_f32", "float32"))
  s = g.op("Div", s, g.const(6.0, "six_f32", "float32"))
  return g.op("Mul", x, s)


def _bottleneck(g: Graph, w: Weights, path: str, x: str, size: int, *,
                c_in: int, mid: int, features: int, kernel: int, stride: int,
                se_ratio: float, dfc: bool) -> tuple[str, int]:
  """GhostBottleneckV3 (deploy); returns (output, output side)."""
  y = _ghost(g, w, f"{path}/ghost1", x, size, features=mid, relu=True,
             dfc=dfc)
  out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
  if stride > 1:
    y = _conv(g, w, f"{path}/conv_dw", y, kernel=(kernel, kernel),
              strides=stride, group=mid)
  if se_ratio > 0:
    y = _se(g, w, f"{path}/se", y)
  y = _ghost(g, w, f"{path}/ghost2", y, out_size, features=features,
             relu=False, dfc=False)
  if c_in == features and stride == 1:
    return g.op("Add", y, x), out_size
  sc = conv_act(g, w, f"{path}/shortcut_0", f"{path}/shortcut_1/bn", x,
                eps=EPS, strides=stride, pads=_pads(kernel, kernel),
                group=c_in, next_conv=f"{path}/shortcut_2")
  sc = conv_act(g, w, f"{path}/shortcut_2", f"{path}/shortcut_3/bn", sc,
                eps=EPS, strides=1, pads=(0,) * 4)
  return g.op("Add", y, sc), out_size


def ghostnet_v3(g: Graph, w: Weights, m, x: str, image_size: int) -> str:
  """GhostNetV3 backbone (deploy=True): (B, 3, S, S) -> (B, head_features)."""
  if not m.deploy:
    raise ValueError(
        "the GhostNetV3 ONNX writer exports the folded student: build it "
        "with deploy=True and ghostnet.reparameterize its variables (before "
        "calibrating an int8 one).")
  b = "backbone"
  x = conv_act(g, w, f"{b}/conv_stem", f"{b}/bn1/bn", x, eps=EPS, strides=2,
               pads=_pads(3, 3), act="relu")
  size = (image_size + 2 - 3) // 2 + 1
  c_in = make_divisible(16 * m.width, 4)
  layer = 0
  for gi, group in enumerate(m.cfgs):
    for j, (k, expanded, c, se_ratio, s) in enumerate(group):
      features = make_divisible(c * m.width, 4)
      x, size = _bottleneck(
          g, w, f"{b}/blocks_{gi}_{j}", x, size, c_in=c_in,
          mid=make_divisible(expanded * m.width, 4), features=features,
          kernel=k, stride=s, se_ratio=se_ratio, dfc=layer > 1)
      c_in = features
      layer += 1
  last = f"{b}/blocks_{len(m.cfgs)}_0"
  x = conv_act(g, w, f"{last}/conv", f"{last}/bn1/bn", x, eps=EPS, strides=1,
               pads=(0,) * 4, act="relu")
  x = g.op("ReduceMean", x, g.ints([2, 3]), keepdims=1)
  x = g.op("Relu", _conv(g, w, f"{b}/conv_head", x))
  return g.op("Flatten", x, axis=1)
