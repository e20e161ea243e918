"""Static int8 students: calibrate on train batches of both modalities.

The paper's reported numbers (and its export) use static activation ranges:
the running max of |x| over 2 batches of 32 train images, RGB and non-RGB
both, then frozen, measured with quantisation disabled (float forward
pass, the reference's protocol; `calibration_mode='fake_quant'` measures
them on the fake-quant forward pass instead). Weights are per output
channel in every case.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax import quant
from edgevl_jax.edgevl import checks
from edgevl_jax.edgevl import curation
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.run import config as config_lib

f = config_lib.field
# Keys of the jobs that calibrate a student (zero_shot_eval, export).
SCHEMA: config_lib.Schema = {
    **splits.DATA_SCHEMA,
    "teacher": f("", "HF CLIP folder or a clip_pretrain workdir (text "
                 "features)"),
    "student": f("", "the (quantisation-aware) student workdir"),
    "pseudo_labels": f("", "pseudo_labels workdir (calibration subset)"),
    "image_size": f(224, "input side S"),
    "prompt_ensemble": f(False, "all prompt templates instead of the first"),
    "calibration_batch_size": f(32, "pairs per calibration batch"),
    "calibration_batches": f(2, "calibration batches (train, curated)"),
    "crop_scale": f((0.08, 1.0), "crop scale of the calibration images"),
    "calibration_mode": f("float", "ranges measured on the 'float' forward "
                          "pass (reference) or the 'fake_quant' one"),
}
CALIBRATION_MODES = ("float", "fake_quant")
del f


def validate(config: Any) -> None:
  """The checks of a job built on SCHEMA; no compute."""
  checks.common_edgevl(config)
  config_lib.require(config, "calibration_mode", allowed=CALIBRATION_MODES)
  checks.positive_ints(config, "calibration_batch_size",
                       "calibration_batches")
  checks.teacher_folder(config)
  checks.student_folder(config, "student")
  checks.student_fits_teacher(config, "student")


def calibration_inputs(source: Any, *, normalization: str, image_size: int,
                       batch_size: int, num_batches: int, seed: int,
                       indices: Any = None,
                       crop_scale: tuple[float, float] = (0.08, 1.0)
                       ) -> list[jax.Array]:
  """`num_batches` normalised (2B, S, S, 3) batches [non-RGB; RGB]."""
  norm = handoff.normalizer(normalization)
  batches = splits.first_batches(
      source, image_size=image_size, batch_size=batch_size,
      num_batches=num_batches, seed=seed, indices=indices,
      crop_scale=crop_scale)
  return [norm(jnp.asarray(np.concatenate([b["other"], b["rgb"]])))
          for b in batches]


def calibrated_variables(meta: Mapping[str, Any], params: Any,
                         batches: list[jax.Array], mode: str = "float",
                         model_state: Mapping[str, Any] | None = None
                         ) -> dict[str, Any]:
  """{'params', 'quant_stats'} (+ model_state, e.g. 'batch_stats'): static
  int8 ranges from `batches`.

  mode: 'float' (quantisation disabled while measuring, the reference) or
  'fake_quant' (each range sees the quantised outputs of the layers before).
  """
  if mode not in CALIBRATION_MODES:
    raise ValueError(f"calibration mode {mode!r}; expected one of "
                     f"{CALIBRATION_MODES}.")
  spec = quant.int8(calibration="static").replace(
      phase="calibrate", float_calibration=mode == "float")
  m_cal = handoff.build_student(meta, spec)
  return quant.calibrate(m_cal.apply,
                         {"params": params, **dict(model_state or {})},
                         batches)


def calibrate_student(config: Any, student_path: str, source: Any,
                      cache: dict[Any, Any] | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any], Any]:
  """(meta, calibrated variables, fp32 params) of the student at a path.

  The calibrated variables hold the student's BatchNorm statistics too
  (when it has them).

  Calibrates on config.calibration_batches batches of
  config.calibration_batch_size train pairs of the curated subset (both
  modalities). `cache` (the pipeline's) keeps the result, so the evaluation
  and export stages of one pipeline calibrate once.
  """
  indices, _ = curation.curated_subset(config.pseudo_labels)
  key = ("calibration", os.path.abspath(student_path),
         config.calibration_batch_size, config.calibration_batches,
         config.seed, config.pseudo_labels, tuple(config.crop_scale),
         config.image_size, config.calibration_mode)
  if cache is not None and key in cache:
    return cache[key]
  _, variables, meta = handoff.student_variables(student_path)
  params = variables.pop("params")
  batches = calibration_inputs(
      source, normalization=meta["normalization"],
      image_size=config.image_size, batch_size=config.calibration_batch_size,
      num_batches=config.calibration_batches, seed=config.seed,
      indices=indices, crop_scale=tuple(config.crop_scale))
  out = (meta, calibrated_variables(meta, params, batches,
                                    config.calibration_mode,
                                    model_state=variables), params)
  if cache is not None:
    cache[key] = out
  return out


def static_student(meta: Mapping[str, Any], variables: Mapping[str, Any]
                   ) -> tuple[Any, Callable[..., Any]]:
  """(static int8 model, jitted embed fn images in [0, 1] -> (B, D))."""
  model = handoff.build_student(meta, quant.int8(calibration="static"))
  norm = handoff.normalizer(meta["normalization"])
  embed = jax.jit(lambda v, x: model.apply(v, norm(x)))
  return model, lambda x: embed(variables, x)
