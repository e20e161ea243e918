"""Static activation ranges: the running max of |x| over calibration batches.

EdgeVL's static mode (spec "Quantisation used by the paper"): the activation
amax of every quantised matmul input is the running max of |x| over a few
calibration batches (2 x 32 images, RGB and non-RGB), then frozen. AQT 0.9
ships `MeanOfAbsMaxCalibration` (the *mean* of per-batch maxima), which is a
different statistic, so the running max lives here as an AQT `Calibration`
that is also a Flax module: AQT instantiates it inside the quantised layer,
which binds it into the layer's scope and gives it a variable.

Variables (collection `QUANT_STATS`, never in `params`, so the optimiser and
the fp32 parameter tree do not see them):
  `<layer path>/.../RunningAbsMaxCalibration_0/amax`: shape (1,) * x.ndim,
  the per-tensor running max of |x|.
"""
from __future__ import annotations

from typing import Sequence

from aqt.jax.v2 import calibration as aqt_calibration
from aqt.jax.v2 import utils as aqt_utils
from aqt.jax.v2.numerics import numerics as aqt_numerics
import flax.linen as nn
import jax
import jax.numpy as jnp

# Collection holding the calibrated static activation ranges.
QUANT_STATS = "quant_stats"


@aqt_utils.flax_slots_kw_only_dataclass
class RunningAbsMaxCalibration(aqt_calibration.Calibration, nn.Module):
  """Per-tensor static amax = running max of |x|, frozen outside calibration.

  Attributes:
    quant_collection: variable collection of the running max.
    update: True in the 'calibrate' phase (fold this batch's max|x| into the
      running max; the collection must be mutable); False otherwise (read the
      frozen value).
  """

  quant_collection: str = QUANT_STATS
  update: bool = False

  @nn.compact
  def get_bound(
      self, x: jax.Array, shared_axes: Sequence[int] | None
  ) -> jax.Array:
    """Returns amax with shape x.shape reduced (keepdims) over `shared_axes`.

    Args:
      x: the activation being quantised, any shape.
      shared_axes: axes sharing one range; None means all (per tensor).
    """
    axes = tuple(range(x.ndim)) if shared_axes is None else tuple(shared_axes)
    batch_amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    batch_amax = jax.lax.stop_gradient(batch_amax).astype(jnp.float32)
    initializing = self.is_initializing()
    missing = not self.has_variable(self.quant_collection, "amax")
    if missing and not initializing and not self.update:
      where = "/".join(map(str, self.path))
      raise ValueError(
          "Static activation range missing: variables have no "
          f"'{self.quant_collection}' entries for {where}. "
          "Run edgevl_jax.quant.calibrate(...) with a model built with "
          "phase='calibrate' first and pass its result (or use "
          "calibration='dynamic')."
      )
    amax = self.variable(
        self.quant_collection, "amax", jnp.zeros, batch_amax.shape, jnp.float32
    )
    if self.update and not initializing:
      amax.value = jnp.maximum(amax.value, batch_amax)
    bound = amax.value
    # An all-zero range (an uncalibrated or dead input) must not divide by 0.
    return jnp.where(bound > 0.0, bound, jnp.ones_like(bound))

  def get_scale_and_bias_and_sparsity(
      self,
      x: jax.Array,
      shared_axes: Sequence[int] | None,
      numerics_: aqt_numerics.AqtNumerics,
      context: aqt_utils.Context | None = None,
  ) -> tuple[list[jax.Array], list[jax.Array], None]:
    """AQT hook: quantisation step = amax / quant_bound (127 for int8)."""
    del context
    bound = self.get_bound(x, shared_axes)
    step = bound / numerics_.get_quant_bound()
    dtype = self.dtype if self.dtype is not None else x.dtype
    return [step.astype(dtype)], [], None
