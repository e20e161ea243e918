"""edgevl_jax.quant: AQT int8/int4 quantisation-aware training and serving.

See spec.py (QuantSpec, presets, numerics and rng notes) and flow.py
(calibrate -> convert -> serve).
"""
from edgevl_jax.quant.calibration import QUANT_STATS, RunningAbsMaxCalibration
from edgevl_jax.quant.conv import AQT_COLLECTION, QuantConvGeneralDilated
from edgevl_jax.quant.flow import (calibrate, convert, drop_frozen_kernels,
                                   serve_apply, served_nbytes,
                                   with_kernel_placeholders)
from edgevl_jax.quant.spec import (QuantSpec, int4_weights, int8,
                                   int8_weight_only)
