"""A small ONNX graph writer with the project's int8 QDQ numerics.

`Graph` appends nodes and initialisers (onnx.helper) and knows the two int8
encodings of the same codes q in [-127, 127] (numerics.py: step = amax / 127,
round half to even):

  's8s8': activations int8, zero point 0 (TensorRT, ARM dot-product, VNNI);
  'u8':   activations uint8, zero point 128 (x86 AVX2 without VNNI, whose
          u8 x s8 kernels do not saturate): the stored byte is q + 128, and
          DequantizeLinear gives (q + 128 - 128) * step, the same value.

Weights are int8 initialisers with a per-output-channel DequantizeLinear
(zero point 0) in both encodings. `Graph(encoding=None)` writes the fp32 graph
from the same calls (quantisers become no-ops, weights float).

    g = Graph("vit_s16", encoding="u8")
    y = g.dense(x, layer)             # QDQ(x) @ DQ(W) + b
    model = g.model(inputs, outputs)  # onnx.ModelProto, opset 21
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper

OPSET = 21
ENCODINGS = ("s8s8", "u8")


@dataclasses.dataclass
class Layer:
  """One Dense or Conv as the export sees it.

  Attributes:
    kernel: float kernel (dense (K, O); conv (O, I, kh, kw)) of a float layer.
    codes: int8 codes of a quantised layer, same layout as `kernel`.
    step: (O,) float32 per-output-channel weight step (codes * step = W).
    bias: (O,) float32 or None.
    amax: static |x| range of the layer input (step amax / 127), or None for
      a layer the int8 student keeps float.
  """

  kernel: np.ndarray | None = None
  codes: np.ndarray | None = None
  step: np.ndarray | None = None
  bias: np.ndarray | None = None
  amax: float | None = None

  @property
  def quantised(self) -> bool:
    return self.codes is not None

  def scaled(self, factor: np.ndarray, shift: np.ndarray) -> "Layer":
    """y -> y * factor + shift per output channel (a folded BatchNorm).

    A quantised layer keeps its codes (the sign of a negative factor moves
    into the codes, so steps stay positive); only the step changes.
    """
    factor = np.asarray(factor, np.float32)
    bias = np.zeros_like(factor) if self.bias is None else self.bias
    bias = (bias * factor + shift).astype(np.float32)
    if self.quantised:
      sign = np.where(factor < 0, -1, 1).astype(np.int8)
      shape = (-1,) + (1,) * (self.codes.ndim - 1)
      return Layer(codes=(self.codes * sign.reshape(shape)).astype(np.int8),
                   step=(self.step * np.abs(factor)).astype(np.float32),
                   bias=bias, amax=self.amax)
    shape = (-1,) + (1,) * (self.kernel.ndim - 1)
    return Layer(kernel=(self.kernel * factor.reshape(shape)).astype(
        np.float32), bias=bias)


class Graph:
  """Accumulates nodes and initialisers; `model()` returns the ModelProto.

  Attributes:
    encoding: None (fp32), 's8s8' or 'u8'.
  """

  def __init__(self, name: str, encoding: str | None = None):
    if encoding not in (None,) + ENCODINGS:
      raise ValueError(f"encoding must be one of {ENCODINGS} or None, got "
                       f"{encoding!r}.")
    self.name = name
    self.encoding = encoding
    self.nodes: list[onnx.NodeProto] = []
    self.inits: dict[str, onnx.TensorProto] = {}
    self._count = 0

  # ----- primitives -----------------------------------------------------------
  def fresh(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, value: Any, name: str | None = None,
            dtype: Any = None) -> str:
    """An initialiser; a given `name` is shared (written once)."""
    if name is not None and name in self.inits:
      return name
    arr = np.asarray(value, dtype)
    if arr.dtype == np.float64:
      arr = arr.astype(np.float32)
    name = name or self.fresh("c")
    self.inits[name] = numpy_helper.from_array(arr, name)
    return name

  def ints(self, values: Sequence[int]) -> str:
    """An int64 1-D constant (shapes, axes), shared by value."""
    values = [int(v) for v in values]
    return self.const(np.asarray(values, np.int64),
                      "i64_" + "_".join(str(v).replace("-", "m")
                                        for v in values))

  def op(self, op_type: str, *inputs: str, hint: str | None = None,
         **attrs) -> str:
    """Appends one single-output node; returns its output name."""
    out = self.fresh(hint or op_type.lower())
    self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                       name=out, **attrs))
    return out

  # ----- quantisation ---------------------------------------------------------
  def quant(self, x: str, amax: float | None) -> str:
    """QuantizeLinear + DequantizeLinear of x at step amax / 127.

    Identity in the fp32 graph or for a float layer (amax None).
    """
    if self.encoding is None or amax is None:
      return x
    amax = float(amax) if float(amax) > 0 else 1.0  # as RunningAbsMax does
    scale = self.const(np.float32(np.float32(amax) / np.float32(127.0)))
    zp = self.const(np.uint8(128) if self.encoding == "u8" else np.int8(0),
                    f"zp_{self.encoding}")
    q = self.op("QuantizeLinear", x, scale, zp, hint="q")
    return self.op("DequantizeLinear", q, scale, zp, hint="dq")

  def _weight(self, layer: Layer, axis: int) -> str:
    if self.encoding is None or not layer.quantised:
      kernel = (layer.kernel if layer.kernel is not None else
                layer.codes.astype(np.float32) * np.expand_dims(
                    layer.step, tuple(i for i in range(layer.codes.ndim)
                                      if i != axis)))
      return self.const(kernel.astype(np.float32))
    codes = self.const(layer.codes.astype(np.int8))
    step = self.const(layer.step.astype(np.float32))
    zero = self.const(np.zeros(layer.step.shape, np.int8))
    return self.op("DequantizeLinear", codes, step, zero, axis=axis,
                   hint="w")

  # ----- layers ---------------------------------------------------------------
  def dense(self, x: str, layer: Layer) -> str:
    """(..., K) @ (K, O) + b, the input quantised when the layer is."""
    q = self.quant(x, layer.amax if layer.quantised else None)
    y = self.op("MatMul", q, self._weight(layer, 1))
    if layer.bias is not None:
      y = self.op("Add", y, self.const(layer.bias.astype(np.float32)))
    return y

  def conv(self, x: str, layer: Layer, *, strides: int,
           pads: Sequence[int], group: int = 1) -> str:
    """NCHW conv; pads (top, left, bottom, right); kernel (O, I/g, kh, kw)."""
    q = self.quant(x, layer.amax if layer.quantised else None)
    inputs = [q, self._weight(layer, 0)]
    if layer.bias is not None:
      inputs.append(self.const(layer.bias.astype(np.float32)))
    shape = (layer.kernel if layer.kernel is not None else layer.codes).shape
    return self.op("Conv", *inputs, strides=[strides, strides],
                   pads=list(pads), group=group,
                   kernel_shape=list(shape[2:]))

  def layer_norm(self, x: str, scale: np.ndarray, bias: np.ndarray,
                 eps: float) -> str:
    return self.op("LayerNormalization", x, self.const(scale),
                   self.const(bias), axis=-1, epsilon=float(eps))

  def reshape(self, x: str, shape: Sequence[int]) -> str:
    return self.op("Reshape", x, self.ints(shape))

  def transpose(self, x: str, perm: Sequence[int]) -> str:
    return self.op("Transpose", x, perm=list(perm))

  def slice(self, x: str, starts, ends, axes, steps=None) -> str:
    args = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
    if steps is not None:
      args.append(self.ints(steps))
    return self.op("Slice", *args)

  def mean(self, x: str, axes: Sequence[int]) -> str:
    return self.op("ReduceMean", x, self.ints(axes), keepdims=0)

  # ----- model ----------------------------------------------------------------
  def model(self, inputs: Sequence[onnx.ValueInfoProto],
            outputs: Sequence[onnx.ValueInfoProto],
            doc: str = "") -> onnx.ModelProto:
    graph = helper.make_graph(self.nodes, self.name, list(inputs),
                              list(outputs), list(self.inits.values()))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgevl_jax", doc_string=doc)
    model.ir_version = 10
    return model
