"""Static int8 students: calibrate on train batches of both modalities.

The paper's reported numbers (and its export) use static activation ranges:
the running max of |x| over 2 batches of 32 train images, RGB and non-RGB
both, then frozen. Weights are per output channel in every case.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax import quant
from edgevl_jax.eval import artefacts
from edgevl_jax.eval import splits


def calibration_inputs(source: Any, *, normalization: str, image_size: int,
                       batch_size: int, num_batches: int, seed: int,
                       indices: Any = None,
                       crop_scale: tuple[float, float] = (0.08, 1.0)
                       ) -> list[jax.Array]:
  """`num_batches` normalised (2B, S, S, 3) batches [non-RGB; RGB]."""
  norm = artefacts.normalizer(normalization)
  batches = splits.first_batches(
      source, image_size=image_size, batch_size=batch_size,
      num_batches=num_batches, seed=seed, indices=indices,
      crop_scale=crop_scale)
  return [norm(jnp.asarray(np.concatenate([b["other"], b["rgb"]])))
          for b in batches]


def static_student(meta: Mapping[str, Any], params: Any,
                   batches: list[jax.Array]
                   ) -> tuple[Any, dict[str, Any], Callable[..., Any]]:
  """(static model, variables with quant_stats, jitted embed fn).

  The embed fn maps images in [0, 1] (normalised inside) to (B, D).
  """
  spec = quant.int8(calibration="static")
  m_cal = artefacts.build_student(meta, spec.replace(phase="calibrate"))
  variables = quant.calibrate(m_cal.apply, {"params": params}, batches)
  model = artefacts.build_student(meta, spec)
  norm = artefacts.normalizer(meta["normalization"])
  embed = jax.jit(lambda v, x: model.apply(v, norm(x)))
  return model, variables, lambda x: embed(variables, x)
