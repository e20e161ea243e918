"""Trainer 'export_stage': the deployable EdgeVL artefact and its size.

Writes into WORKDIR/export/ the `edgevl_jax.export.artifact` folder:
the `jax.export` program of the static-calibrated int8 student
(weights.msgpack: int8 kernels + per-channel scales, frozen activation
ranges, fp32 rest), text_features.npy ((num_classes, D) L2-normalised class
prompts, so the device needs no text tower) and manifest.json (class names,
input normalisation, sizes); plus student.json (the architecture).
Sizes: the teacher's fp32 image tower, the fp32 student, the int8 student
(stored bytes, `export.size.model_size`).

Config keys: dataset, data_dir, data_config, teacher, student (workdir),
pseudo_labels (calibration subset), image_size, calibration_batch_size,
calibration_batches, crop_scale, seed, prompt_ensemble.
Report: export_dir, model_bytes.{teacher_fp32, student_fp32, student_int8},
compression.{fp32, int8} (teacher bytes / student bytes).
"""
from __future__ import annotations

import json
import os
from typing import Any


from edgevl_jax.eval import artefacts
from edgevl_jax.eval import quantized
from edgevl_jax.eval import splits
from edgevl_jax.export import artifact
from edgevl_jax.export import size as size_lib
from edgevl_jax.models import clip
from edgevl_jax.train import checks
from edgevl_jax.train import config_utils
from edgevl_jax.train import dual_modality_kd as kd
from edgevl_jax.train import metrics as metrics_lib

EXPORT_DIR = "export"


def validate_config(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("dataset", "data_dir", "teacher", "student"):
    config_utils.require(config, key, types=str)
  for key in ("image_size", "calibration_batch_size", "calibration_batches"):
    config_utils.require_positive(config, key, integer=True)
  checks.dataset(config)
  checks.seed(config)
  checks.teacher_folder(config)
  checks.student_folder(config, "student")
  checks.student_fits_teacher(config, "student")


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Calibrates, converts and writes the int8 student + text features."""
  validate_config(config)
  out = os.path.join(workdir, EXPORT_DIR)
  os.makedirs(out, exist_ok=True)
  train_src = splits.load_source(config, "train")
  info = train_src.info
  teacher_folder = artefacts.teacher_dir(config.teacher)
  teacher, t_params, tokenizer = artefacts.load_teacher(teacher_folder)
  templates = (info.prompt_templates if config.get("prompt_ensemble", False)
               else info.prompt_templates[:1])
  text = artefacts.text_features(teacher, t_params, tokenizer,
                                 info.class_names, templates)
  _, params, meta = artefacts.load_student(config.student)
  indices, _ = kd.curated_subset(config)
  calib = quantized.calibration_inputs(
      train_src, normalization=meta["normalization"],
      image_size=config.image_size, batch_size=config.calibration_batch_size,
      num_batches=config.calibration_batches, seed=config.seed,
      indices=indices, crop_scale=tuple(config.crop_scale))
  teacher_bytes = size_lib.teacher_image_tower_size(
      clip.load_config(teacher_folder))["bytes_fp32"]
  manifest = artifact.export_from_student(
      out, meta=meta, params=params, calibration_batches=calib,
      text_features=text, class_names=list(info.class_names),
      teacher_bytes=int(teacher_bytes))
  student_fp32 = size_lib.model_size({"params": params})["bytes"]
  student_int8 = int(manifest["bytes"]["student_int8"])
  metrics_lib.atomic_write_text(
      os.path.join(workdir, "student.json"),
      json.dumps({**meta, "quant": "int8_static"}, indent=2))
  report = {
      "export_dir": EXPORT_DIR,
      "model_bytes": {"teacher_fp32": int(teacher_bytes),
                      "student_fp32": int(student_fp32),
                      "student_int8": int(student_int8),
                      "text_features": int(text.nbytes)},
      "compression": {"fp32": teacher_bytes / student_fp32,
                      "int8": teacher_bytes / student_int8},
      "export": {"num_classes": int(text.shape[0]),
                 "embed_dim": int(text.shape[1]),
                 "batch_sizes": manifest["batch_sizes"],
                 "files": sorted(os.listdir(out))},
  }
  with metrics_lib.MetricWriter(workdir, tensorboard=False,
                                progress=False) as writer:
    writer.write(0, {"model_bytes/" + k: v
                     for k, v in report["model_bytes"].items()})
  return report
