"""Symmetric integer numerics: the exact rounding and clipping used everywhere.

For b-bit symmetric quantisation with range amax (qmax = 2**(b-1) - 1, i.e.
127 for int8, 7 for int4):

  step  = amax / qmax                       (AQT calls this the "scale")
  q     = round_half_to_even(clip(x * (1 / step), -qmax, qmax))
  x_hat = q * step
  d x_hat / d x = 1 where |x| <= amax, else 0       (straight-through estimator)

This is AQT's `IntSymmetric(preserve_zero=True, preserve_max_val=True,
clip=True, round=True, clip_gradient=True)`. Compared with the paper's
formula (scale = 127 / amax, q = clip(round(x * scale), -128, 127)) the only
difference is the symmetric clip: -128 is never produced. With dynamic ranges
|x * scale| <= 127 always, so the two are identical; with static ranges they
differ only for x < -amax * 127.5 / 127, where we clip to -127 (consistent
with the STE mask |x| <= amax, and with symmetric int8 kernels). Rounding is
round-half-to-even in both (torch.round and lax.round TO_NEAREST_EVEN).
AQT's default `get_numerics(8)` (preserve_max_val=False) would instead use
step = amax / 127.5 and no gradient clipping; we do not use it.

`ste_quantize` is the same numerics written directly (used by the conv,
which AQT 0.9 cannot quantise per tensor).
"""
from __future__ import annotations

import functools

from aqt.jax.v2.numerics import int_numerics
import jax
import jax.numpy as jnp

SUPPORTED_BITS = (4, 8)


def qmax(bits: int) -> int:
  """Largest code of symmetric `bits`-bit quantisation (127 for int8)."""
  return 2 ** (bits - 1) - 1


def int_dtype(bits: int) -> jnp.dtype:
  """Storage dtype of the codes: int8, or jnp.int4 (one byte per element in
  numpy / msgpack; XLA may pack it on device)."""
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
  return jnp.int8 if bits == 8 else jnp.int4


def aqt_numerics(bits: int) -> int_numerics.IntSymmetric:
  """AQT numerics implementing the formula in the module docstring."""
  return int_numerics.IntSymmetric(
      bits=bits,
      preserve_zero=True,
      preserve_max_val=True,
      clip=True,
      clip_gradient=True,
      round=True,
      noise_fn=None,  # no stochastic rounding: nothing needs an rng
      dtype=int_dtype(bits),
  )


def passthrough_numerics(bits: int) -> int_numerics.IntSymmetric:
  """`aqt_numerics(bits)` without clipping, rounding or the integer cast.

  AQT still asks the layer's calibration for the step (so a static range
  records its running max) but x / step * step is x up to one float
  rounding: the float forward pass of the reference's calibration (the
  ranges are measured with quantisation disabled).
  """
  return int_numerics.IntSymmetric(
      bits=bits, preserve_zero=True, preserve_max_val=True, clip=False,
      clip_gradient=False, round=False, noise_fn=None, dtype=None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _round_clip(v: jax.Array, bound: float) -> jax.Array:
  return jnp.round(jnp.clip(v, -bound, bound))


def _round_clip_fwd(v, bound):
  return _round_clip(v, bound), (jnp.abs(v) <= bound)


def _round_clip_bwd(bound, inside, g):
  del bound
  return (g * inside.astype(g.dtype),)


_round_clip.defvjp(_round_clip_fwd, _round_clip_bwd)


def quant_step(amax: jax.Array, bits: int) -> jax.Array:
  """step = amax / qmax, with amax == 0 treated as 1 (as AQT does)."""
  amax = jnp.where(amax > 0.0, amax, jnp.ones_like(amax))
  return jax.lax.stop_gradient(amax / qmax(bits))


def ste_quantize(x: jax.Array, step: jax.Array, bits: int) -> jax.Array:
  """Integer codes of x as float (same shape), with the STE gradient.

  Args:
    x: any shape, float.
    step: broadcastable to x (amax / qmax), no gradient.
    bits: 4 or 8.

  Returns:
    q with x's shape and dtype, integer-valued in [-qmax, qmax]; d q / d x =
    (1 / step) * 1[|x| <= amax], so q * step has the STE gradient.
  """
  inv = jnp.where(jnp.isinf(1.0 / step), 1.0, 1.0 / step)
  return _round_clip(x * inv, float(qmax(bits)))
