"""Reads a student's variables as the ONNX writer needs them (numpy only).

Two sources, one interface:
  fp32: {'params', ['batch_stats']} of the float student: float kernels;
  int8: the served variables of `quant.convert` (static calibration): per
    quantised layer `aqt/<path>/<op>/qrhs[/_]value` (int8 codes, kernel
    layout) and `.../scale` (per-output-channel step), its input range
    `quant_stats/<path>/.../amax`, and `params` without those kernels.

Paths are module paths inside the student, '/'-joined, e.g.
'backbone/block0/attn/qkv' or 'head/proj'.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np

from edgevl_jax.export.onnx_graph import Layer

AQT, STATS = "aqt", "quant_stats"


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  out = {}
  if hasattr(tree, "items"):
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
  else:
    value = getattr(tree, "value", tree)  # flax partitioning boxes
    out["/".join(prefix)] = np.asarray(value)
  return out


class Weights:
  """Lookup of layers, parameters and activation ranges by module path.

  Attributes:
    quantised: True for served int8 variables (layers with codes are
      written as int8), False for fp32 variables.
  """

  def __init__(self, variables: Mapping[str, Any]):
    self.flat = _flatten(dict(variables))
    self.quantised = any(k.startswith(AQT + "/") for k in self.flat)

  def _find(self, prefix: str, suffix: str) -> np.ndarray | None:
    hits = [k for k in self.flat
            if k.startswith(prefix + "/") and k.endswith(suffix)]
    if len(hits) > 1:
      raise ValueError(f"{len(hits)} variables match {prefix}/*{suffix}: "
                       f"{hits}; the ONNX writer expects one.")
    return self.flat[hits[0]] if hits else None

  def param(self, path: str, collection: str = "params") -> np.ndarray:
    key = f"{collection}/{path}"
    if key not in self.flat:
      raise ValueError(f"the student has no {key}; the ONNX writer of this "
                       "family does not match the model (check the student "
                       "name and overrides).")
    return self.flat[key].astype(np.float32)

  def has(self, path: str, collection: str = "params") -> bool:
    return f"{collection}/{path}" in self.flat

  def amax(self, path: str) -> float | None:
    """The static input range of a quantised layer (None when float)."""
    value = self._find(f"{STATS}/{path}", "amax")
    return None if value is None else float(np.asarray(value).reshape(()))

  def einsum_amax(self, path: str, eqn: str, lhs_shape: Sequence[int],
                  rhs_shape: Sequence[int]
                  ) -> tuple[float | None, float | None]:
    """(lhs, rhs) static ranges of an AqtEinsum; (None, None) when float.

    AqtEinsum hands its operands to dot_general in the order jnp.einsum
    does, which swaps them for some equations (attn v does); its
    calibrations _0 / _1 follow that order, so the swap is recomputed here.
    """
    first = self._find(f"{STATS}/{path}", "RunningAbsMaxCalibration_0/amax")
    second = self._find(f"{STATS}/{path}", "RunningAbsMaxCalibration_1/amax")
    if first is None or second is None:
      return None, None
    pair = float(first.reshape(())), float(second.reshape(()))
    return pair[::-1] if einsum_swaps(eqn, lhs_shape, rhs_shape) else pair

  def layer(self, path: str, *, conv: bool = False) -> Layer:
    """The Dense (kernel (K, O)) or conv (kernel (O, I, kh, kw)) at `path`."""
    bias = (self.param(f"{path}/bias") if self.has(f"{path}/bias") else None)
    codes = self._find(f"{AQT}/{path}", "value")
    to_onnx = (lambda k: np.transpose(k, (3, 2, 0, 1))) if conv else (
        lambda k: k)
    if codes is not None:
      step = self._find(f"{AQT}/{path}", "scale").reshape(-1)
      amax = self.amax(path)
      return Layer(codes=np.ascontiguousarray(to_onnx(codes.astype(np.int8))),
                   step=step.astype(np.float32), bias=bias,
                   amax=amax)
    kernel = self.param(f"{path}/kernel")
    return Layer(kernel=np.ascontiguousarray(to_onnx(kernel)), bias=bias)

  def conv_bn(self, conv_path: str, bn_path: str, eps: float) -> Layer:
    """A conv with the BatchNorm after it folded in (running statistics).

    y = (conv(x) - mean) * g / sqrt(var + eps) + b: the factor goes into the
    per-channel weight step (the int8 codes are unchanged), the rest into
    the bias.
    """
    layer = self.layer(conv_path, conv=True)
    mean = self.param(f"{bn_path}/mean", "batch_stats")
    var = self.param(f"{bn_path}/var", "batch_stats")
    gamma = (self.param(f"{bn_path}/scale") if self.has(f"{bn_path}/scale")
             else np.ones_like(mean))
    beta = (self.param(f"{bn_path}/bias") if self.has(f"{bn_path}/bias")
            else np.zeros_like(mean))
    factor = (gamma / np.sqrt(var + np.float32(eps))).astype(np.float32)
    return layer.scaled(factor, (beta - mean * factor).astype(np.float32))


@functools.lru_cache(maxsize=None)
def _swaps(eqn: str, lhs_shape: tuple[int, ...],
           rhs_shape: tuple[int, ...]) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  from aqt.jax.v2 import aqt_dot_general  # pylint: disable=g-import-not-at-top
  lhs = jax.ShapeDtypeStruct(lhs_shape, np.float32)
  rhs = jax.ShapeDtypeStruct(rhs_shape, np.float32)
  jaxpr = jax.make_jaxpr(functools.partial(aqt_dot_general.einsum, eqn=eqn))(
      lhs=lhs, rhs=rhs)
  first, _ = jaxpr.eqns[0].invars
  return first == jaxpr.jaxpr.invars[1]


def einsum_swaps(eqn: str, lhs_shape: Sequence[int],
                 rhs_shape: Sequence[int]) -> bool:
  """Whether jnp.einsum passes (rhs, lhs) to dot_general (AqtEinsum's test)."""
  return _swaps(eqn, tuple(lhs_shape), tuple(rhs_shape))
