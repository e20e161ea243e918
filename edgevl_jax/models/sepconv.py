"""Depthwise-separable conv block shared by multi-level heads and exit branches.

`SepConv` is the DARTS-style block that both the CDFKD-MFS E blocks
(multihead.py) and the OFA-KD conv exit branches (ofa_branches.py) use, as
their PyTorch references spell it: two (depthwise 3x3 -> pointwise 1x1 ->
BN -> ReLU) layers, the first depthwise conv strided, PyTorch's symmetric
padding 1.

Its depthwise convs run through `ShiftDepthwiseConv` (unless `ops` injects
another conv): XLA:CPU lowers a grouped convolution with one channel per
group to a slow generic loop (measured 50x slower forward and 5-10x slower
backward than nine shifted multiply-adds at batch 64 on 16-64 channels),
which dominated a data-free iteration on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import layers


def _shift_taps(xp: jax.Array, out_hw: tuple[int, int], stride: int,
                taps: jax.Array) -> jax.Array:
  """sum_{i,j} xp[:, s*y + i, s*x + j, :] * taps[i, j]: (B, Ho, Wo, C).

  Args:
    xp: (B, Hp, Wp, C) padded input.
    out_hw: (Ho, Wo).
    stride: s.
    taps: (kh, kw, C) per-channel weights.
  """
  b, c = xp.shape[0], xp.shape[-1]
  ho, wo = out_hw
  out = None
  for i in range(taps.shape[0]):
    for j in range(taps.shape[1]):
      window = jax.lax.slice(
          xp, (0, i, j, 0),
          (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
          (1, stride, stride, 1))
      term = window * taps[i, j]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, kernel: jax.Array, stride: int,
               padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """Depthwise conv as shifted multiply-adds: x (B, H, W, C), kernel
  (kh, kw, C) -> (B, Ho, Wo, C); same result as lax's grouped conv."""
  return _depthwise_fwd(x, kernel, stride, padding)[0]


def _depthwise_fwd(x, kernel, stride, padding):
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = kernel.shape[:2]
  out_hw = ((xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1)
  return _shift_taps(xp, out_hw, stride, kernel), (xp, kernel, x.shape)


def _depthwise_bwd(stride, padding, res, g):
  # Written out because autodiff of the strided slices gives nine
  # interior-padded scatters, as slow on CPU as the grouped conv itself.
  xp, kernel, x_shape = res
  kh, kw = kernel.shape[:2]
  ho, wo = g.shape[1:3]
  grad_k = jnp.stack([
      jnp.stack([
          jnp.sum(jax.lax.slice(
              xp, (0, i, j, 0),
              (xp.shape[0], i + stride * (ho - 1) + 1,
               j + stride * (wo - 1) + 1, xp.shape[3]),
              (1, stride, stride, 1)) * g, axis=(0, 1, 2))
          for j in range(kw)]) for i in range(kh)])
  # d xp[p] = sum_k g_dilated[p - k] * kernel[k]: a stride-1 correlation of
  # the zero-dilated, zero-padded gradient with the flipped kernel.
  (pt, _), (pl, _) = padding
  h, w = x_shape[1:3]
  zero = jnp.zeros((), g.dtype)
  gp = jax.lax.pad(g, zero, (
      (0, 0, 0),
      (kh - 1 - pt, h + pt + kh - 1 - (stride * (ho - 1) + 1) - (kh - 1), stride - 1),
      (kw - 1 - pl, w + pl + kw - 1 - (stride * (wo - 1) + 1) - (kw - 1), stride - 1),
      (0, 0, 0)))
  grad_x = _shift_taps(gp, (h, w), 1, kernel[::-1, ::-1])
  return grad_x, grad_k


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


class ShiftDepthwiseConv:
  """`lax.conv_general_dilated` stand-in that runs depthwise convs (one
  input channel per group, NHWC/HWIO, no dilation) as shifted multiply-adds
  with a hand-written VJP; any other conv goes to lax unchanged.

  Used as `Ops.conv_general_dilated_cls` (a zero-argument factory).
  """

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None,
               feature_group_count=1, precision=None, **kwargs):
    plain = (lhs.ndim == 4 and rhs.shape[2] == 1
             and feature_group_count == lhs.shape[-1] == rhs.shape[-1]
             and len(set(window_strides)) == 1
             and not isinstance(padding, str)
             and all(d in (None, 1) for d in (lhs_dilation or (1,)))
             and all(d in (None, 1) for d in (rhs_dilation or (1,)))
             and not kwargs
             and tuple(getattr(dimension_numbers, "lhs_spec", ())) ==
             (0, 3, 1, 2)
             and tuple(getattr(dimension_numbers, "rhs_spec", ())) ==
             (3, 2, 0, 1))
    if not plain:
      return jax.lax.conv_general_dilated(
          lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
          rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
          feature_group_count=feature_group_count, precision=precision,
          **kwargs)
    pad = tuple(tuple(int(v) for v in p) for p in padding)
    return _depthwise(lhs, rhs[:, :, 0, :].astype(lhs.dtype),
                      int(window_strides[0]), pad)


class SepConv(nn.Module):
  """Two (depthwise 3x3 -> pointwise 1x1 -> BN -> ReLU) layers.

  dw0 (stride `strides`) -> pw0 (C_in) -> bn0 -> ReLU -> dw1 -> pw1
  (`features`) -> bn1 -> ReLU.

  Attributes:
    features: output channels (of the second pointwise conv).
    strides: stride of the first depthwise conv.
  """

  features: int
  strides: int = 2
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / strides, W / strides, features)."""
    c_in = x.shape[-1]
    depthwise_ops = self.ops
    if self.ops.conv_general_dilated_cls is None:
      depthwise_ops = dataclasses.replace(
          self.ops, conv_general_dilated_cls=ShiftDepthwiseConv)
    for i, (stride, c_out) in enumerate(((self.strides, c_in),
                                         (1, self.features))):
      x = layers.conv(c_in, (3, 3), ops=depthwise_ops, strides=stride,
                      padding=((1, 1), (1, 1)), feature_group_count=c_in,
                      use_bias=False, dtype=self.dtype,
                      kernel_init=layers.conv_init, name=f"dw{i}")(x)
      x = layers.conv(c_out, (1, 1), ops=self.ops, use_bias=False,
                      dtype=self.dtype, kernel_init=layers.conv_init,
                      name=f"pw{i}")(x)
      x = layers.BatchNorm(dtype=self.dtype, name=f"bn{i}")(
          x, use_running_average=not train)
      x = nn.relu(x)
    return x
