"""`QuantSpec`: the paper's int8 scheme (also int4, weight-only) as `Ops`.

A `QuantSpec` is a frozen, hashable dataclass (it is a linen module field of
the students) whose `.ops()` returns the `layers.Ops` every model threads to
`layers.dense` / `layers.einsum` / `layers.conv`:

  dense  -> aqt `AqtDotGeneral`: kernel per output channel (amax = max|w| over
            the contraction axis), input per tensor;
  einsum -> aqt `AqtEinsum` (attention q k^T and attn v): both operands are
            activations, both per tensor;
  conv   -> `QuantConvGeneralDilated` (conv.py): kernel per output channel,
            input per tensor (the ViT patch embedding, CNN convs).

Numerics (numerics.py): symmetric, step = amax / 127, codes clipped to
[-127, 127], round half to even, STE gradient (zero where |x| > amax). The
forward pass multiplies int8 codes with int32 accumulation even in training
(AQT's `dg_accumulator_dtype=int32`), so training, calibrated evaluation and
the served model compute the same numbers. The backward pass is float
(bwd_bits=None) and, with `use_fwd_quant=True`, differentiates through the
*quantised* operands (d(x_hat W_hat)/dx = W_hat * STE mask), the paper's STE.

Presets: `int8()` (the paper: int8 weights and activations, attention
matmuls too), `int4_weights()` (int4 weights, int8 activations),
`int8_weight_only()` (int8 weights, float activations and attention).

Phases (switch with `spec.replace(phase=...)`):
  'train'     fake-quant forward, STE backward (dynamic, or static ranges read
              from the `quant_stats` collection);
  'calibrate' static ranges accumulate their running max (`quant_stats`
              must be mutable; see `flow.calibrate`); with
              `float_calibration` (default, the reference's protocol) the
              forward pass is float (quantisation disabled), otherwise it
              is the fake-quant forward of 'train' (downstream ranges then
              see quantised inputs: up to ~1.6% different amax);
  'convert'   like train, and AQT's freezer writes int weights + scales to the
              `aqt` collection (`flow.convert`);
  'serve'     int weights are read from `aqt`; the float kernels are never
              read (`flow.serve_apply` fills shape-only placeholders).

RNG: AQT's layers default to `prng_name='params'` and call
`make_rng('params')` on every call (to seed stochastic rounding) even when no
stochastic rounding is configured, so `apply` would need `rngs={'params':
key}`. Our numerics have `noise_fn=None`, so we pass `prng_name=None` and the
quantised models need no rng at all (same `apply` call as fp32).

Variable collections: the fp32 `params` tree is unchanged (quantised layers
create no params); `quant_stats` holds static ranges; `aqt` holds converted
int weights. AQT's `aqt` name is kept so its tooling recognises the layout.
"""
from __future__ import annotations

import dataclasses
import functools

from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2 import utils as aqt_utils
from aqt.jax.v2.flax import aqt_flax
from aqt.jax.v2.numerics import no_numerics
import jax

from edgevl_jax.models import layers
from edgevl_jax.quant import calibration
from edgevl_jax.quant import conv as quant_conv
from edgevl_jax.quant import numerics

PHASES = ("train", "calibrate", "convert", "serve")
CALIBRATIONS = ("dynamic", "static")
AQT_COLLECTION = quant_conv.AQT_COLLECTION
QUANT_STATS = calibration.QUANT_STATS

# aqtp 0.9.0's lifted custom_vjp (flax/aqt_flax_dg_core.py) calls
# `jax.core.get_aval`, removed in jax 0.10; its replacement is `jax.typeof`.
# It is only reached when a quantised layer owns variables (static ranges)
# and is differentiated, but then every gradient would fail without this.
if not hasattr(jax.core, "get_aval"):
  jax.core.get_aval = jax.typeof

_WEIGHT_QUANT_MODE = {
    "train": aqt_utils.QuantMode.TRAIN,
    "calibrate": aqt_utils.QuantMode.TRAIN,
    "convert": aqt_utils.QuantMode.CONVERT,
    "serve": aqt_utils.QuantMode.SERVE,
}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Which tensors are quantised, how, and in which phase.

  Attributes:
    weight_bits: bits of Dense / conv kernels, 8 or 4 (per output channel).
    act_bits: bits of matmul inputs and of both attention operands, 8 or None
      (weight-only: activations and attention stay float).
    calibration: 'dynamic' (amax of each batch; stage-2 training) or 'static'
      (running max frozen by `calibrate`; reported numbers and export).
    phase: 'train' | 'calibrate' | 'convert' | 'serve'.
    quantize_attention: quantise q k^T and attn v (the paper does).
    quantize_conv: quantise convolutions (ViT patch embedding, CNN convs).
    float_calibration: in phase 'calibrate', measure the ranges on the float
      forward pass (True, the reference) or on the fake-quant one (False).
  """

  weight_bits: int = 8
  act_bits: int | None = 8
  calibration: str = "dynamic"
  phase: str = "train"
  quantize_attention: bool = True
  quantize_conv: bool = True
  float_calibration: bool = True

  def __post_init__(self):
    if self.weight_bits not in numerics.SUPPORTED_BITS:
      raise ValueError(
          f"QuantSpec.weight_bits must be one of {numerics.SUPPORTED_BITS}, "
          f"got {self.weight_bits!r}")
    if self.act_bits not in (8, None):
      raise ValueError(
          f"QuantSpec.act_bits must be 8 or None (weight-only), got "
          f"{self.act_bits!r}")
    if self.calibration not in CALIBRATIONS:
      raise ValueError(
          f"QuantSpec.calibration must be one of {CALIBRATIONS}, got "
          f"{self.calibration!r}")
    if self.phase not in PHASES:
      raise ValueError(
          f"QuantSpec.phase must be one of {PHASES}, got {self.phase!r}")

  def replace(self, **changes) -> QuantSpec:
    """A copy with fields changed, e.g. `spec.replace(phase='serve')`."""
    return dataclasses.replace(self, **changes)

  @property
  def float_forward(self) -> bool:
    """Calibrating on the float forward pass (quantisation disabled)."""
    return self.phase == "calibrate" and self.float_calibration

  def _numerics(self, bits: int):
    return (numerics.passthrough_numerics(bits) if self.float_forward
            else numerics.aqt_numerics(bits))

  @property
  def static(self) -> bool:
    return self.calibration == "static" and self.act_bits is not None

  def _act_calibration(self):
    if self.static:
      return functools.partial(
          calibration.RunningAbsMaxCalibration,
          quant_collection=QUANT_STATS,
          update=self.phase == "calibrate",
      )
    return None  # keep AQT's AbsMaxCalibration (dynamic)

  def dot_general_config(self) -> aqt_config.DotGeneral:
    """AQT config of a weight matmul: lhs = activation, rhs = kernel."""
    cfg = aqt_config.dot_general_make(
        lhs_bits=self.act_bits, rhs_bits=self.weight_bits, bwd_bits=None,
        use_fwd_quant=True)
    lhs_numerics = (self._numerics(self.act_bits)
                    if self.act_bits else no_numerics.NoNumerics())
    aqt_config.set_numerics(cfg.fwd, lhs_numerics,
                            self._numerics(self.weight_bits))
    if self.act_bits:
      cfg.fwd.dg_quantizer.lhs.calib_shared_axes = "per_tensor"
      if self.static:
        cfg.fwd.dg_quantizer.lhs.calibration = self._act_calibration()
    return cfg

  def einsum_config(self) -> aqt_config.DotGeneral:
    """AQT config of an activation x activation matmul (both per tensor)."""
    bits = self.act_bits
    cfg = aqt_config.dot_general_make(
        lhs_bits=bits, rhs_bits=bits, bwd_bits=None, use_fwd_quant=True)
    aqt_config.set_numerics(cfg.fwd, self._numerics(bits),
                            self._numerics(bits))
    for q in (cfg.fwd.dg_quantizer.lhs, cfg.fwd.dg_quantizer.rhs):
      q.calib_shared_axes = "per_tensor"
      if self.static:
        q.calibration = self._act_calibration()
    return cfg

  def ops(self) -> layers.Ops:
    """The `layers.Ops` that quantise a model built with them."""
    weight_mode = _WEIGHT_QUANT_MODE[self.phase]
    freezing = self.phase in ("convert", "serve")
    dot_general_cls = functools.partial(
        aqt_flax.AqtDotGeneral,
        self.dot_general_config(),
        prng_name=None,
        lhs_quant_mode=aqt_utils.QuantMode.TRAIN,
        lhs_freeze_mode=aqt_flax.FreezerMode.NONE,
        rhs_quant_mode=weight_mode,
        rhs_freeze_mode=(aqt_flax.FreezerMode.CALIBRATION_AND_VALUE
                         if freezing else aqt_flax.FreezerMode.NONE),
        quant_collection=AQT_COLLECTION,
        use_legacy_freezer=True,  # plain {value, scale} arrays: msgpack-able
    )
    einsum_cls = None
    if self.act_bits is not None and self.quantize_attention:
      # Activations are never frozen: their ranges are dynamic or live in
      # quant_stats, so the einsum is in TRAIN mode in every phase.
      einsum_cls = functools.partial(
          aqt_flax.AqtEinsum,
          self.einsum_config(),
          prng_name=None,
          quant_collection=AQT_COLLECTION,
      )
    conv_cls = None
    if self.quantize_conv:
      conv_cls = functools.partial(
          quant_conv.QuantConvGeneralDilated,
          weight_bits=self.weight_bits,
          act_bits=self.act_bits,
          static=self.static,
          phase=self.phase,
          float_forward=self.float_forward,
      )
    return layers.Ops(
        dot_general_cls=dot_general_cls,
        einsum_cls=einsum_cls,
        conv_general_dilated_cls=conv_cls,
    )


def int8(calibration: str = "dynamic", phase: str = "train") -> QuantSpec:
  """The paper's scheme: int8 weights (per channel) and activations."""
  return QuantSpec(8, 8, calibration, phase)


def int4_weights(calibration: str = "dynamic",
                 phase: str = "train") -> QuantSpec:
  """int4 weights (per channel), int8 activations and attention."""
  return QuantSpec(4, 8, calibration, phase)


def int8_weight_only(phase: str = "train") -> QuantSpec:
  """int8 weights (per channel), float activations and attention."""
  return QuantSpec(8, None, "dynamic", phase)
