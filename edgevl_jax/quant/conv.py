"""Quantised `conv_general_dilated`, for `nn.Conv(conv_general_dilated_cls=)`.

AQT 0.9's `AqtConvGeneralDilated` calibrates the input per example (its
shared axes are fixed to all but the batch) and cannot take a per-tensor or
static range, which the paper's ViT patch embedding needs, so the conv
numerics are written here with exactly the formula of `numerics.py`:

  weights (HWIO kernel): per output channel, amax = max |w| over (H, W, I);
  input: per tensor, dynamic (this batch) or static
    (`RunningAbsMaxCalibration`).

Phases:
  train / calibrate: conv of the float integer codes (q_x, q_w), rescaled by
    step_x * step_w per output channel; STE gradients to x and w.
  convert: as train, and writes the int codes and per-channel steps of the
    kernel to the `aqt` collection (`qrhs/value`, `qrhs/scale`, the same names
    as AQT's dot_general freezer so one rule finds every frozen kernel).
  serve: reads the int kernel, quantises the input to int8 and runs an
    integer conv with int32 accumulation; the float kernel is never read.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.quant import calibration
from edgevl_jax.quant import numerics

# Collection of frozen integer weights (the same name AQT's freezer uses).
AQT_COLLECTION = "aqt"


class QuantConvGeneralDilated(nn.Module):
  """Drop-in for `lax.conv_general_dilated` inside `nn.Conv`.

  Attributes:
    weight_bits: 8 or 4.
    act_bits: 8, or None for weight-only quantisation.
    static: activation range from `RunningAbsMaxCalibration` (else dynamic).
    phase: 'train' | 'calibrate' | 'convert' | 'serve'.
    float_forward: (phase 'calibrate') record the input range, then run the
      float conv (the reference calibrates with quantisation disabled).
  """

  weight_bits: int = 8
  act_bits: int | None = 8
  static: bool = False
  phase: str = "train"
  float_forward: bool = False

  def _input_step(self, lhs: jax.Array) -> jax.Array:
    if self.static:
      amax = calibration.RunningAbsMaxCalibration(
          update=self.phase == "calibrate", name="lhs_calibration"
      ).get_bound(lhs, None)
    else:
      amax = jnp.max(jnp.abs(lhs), keepdims=True)
    return numerics.quant_step(amax.astype(jnp.float32), self.act_bits)

  @nn.compact
  def __call__(
      self,
      lhs: jax.Array,
      rhs: jax.Array,
      window_strides: Sequence[int],
      padding: Any,
      lhs_dilation: Sequence[int] | None = None,
      rhs_dilation: Sequence[int] | None = None,
      dimension_numbers: Any = None,
      feature_group_count: int = 1,
      batch_group_count: int = 1,
      precision: Any = None,
      preferred_element_type: Any = None,
  ) -> jax.Array:
    """Args as `lax.conv_general_dilated`; lhs (N, ..., C), rhs (..., I, O).

    Returns:
      (N, ..., O) float32 output.
    """
    del preferred_element_type  # int32 accumulation in serve, float otherwise
    out_axis = rhs.ndim - 1
    w_axes = tuple(range(out_axis))
    conv = lambda a, b, **kw: jax.lax.conv_general_dilated(
        a, b, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, **kw)

    w_dtype = numerics.int_dtype(self.weight_bits)
    if self.phase == "serve":
      qw = self.variable(AQT_COLLECTION, "qrhs_value", jnp.zeros, rhs.shape,
                         w_dtype)
      w_step = self.variable(AQT_COLLECTION, "qrhs_scale", jnp.ones,
                             (rhs.shape[-1],), jnp.float32).value
      qw = qw.value
    else:
      w_amax = jnp.max(jnp.abs(rhs), axis=w_axes)
      w_step = numerics.quant_step(w_amax, self.weight_bits)
      qw = numerics.ste_quantize(rhs, w_step, self.weight_bits)
      if self.phase == "convert":
        self.put_variable(AQT_COLLECTION, "qrhs_value", qw.astype(w_dtype))
        self.put_variable(AQT_COLLECTION, "qrhs_scale", w_step)

    if self.act_bits is None:
      # Weight-only: float input times the integer codes, rescaled after.
      out = conv(lhs, qw.astype(lhs.dtype), precision=precision)
      return out * w_step.astype(out.dtype)

    x_step = self._input_step(lhs)
    if self.float_forward:
      return conv(lhs, rhs, precision=precision)
    qx = numerics.ste_quantize(lhs, x_step, self.act_bits)
    if self.phase == "serve":
      out = conv(qx.astype(jnp.int8), qw.astype(jnp.int8),
                 preferred_element_type=jnp.int32).astype(jnp.float32)
    else:
      out = conv(qx, qw, precision=precision)
    # x_step is (1,) * ndim and w_step is (O,): both broadcast over NHWC.
    return out * (x_step.reshape(()) * w_step).astype(out.dtype)
