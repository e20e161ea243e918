"""Job 'export': the deployable EdgeVL artefact and its size.

Writes into WORKDIR/export/ the `edgevl_jax.export.artifact` folder: the
`jax.export` program of the static-calibrated int8 student (weights.msgpack:
int8 kernels + per-channel scales, frozen activation ranges, fp32 rest),
text_features.npy ((num_classes, D) L2-normalised class prompts, so the
device needs no text tower) and manifest.json (class names, input
normalisation, sizes); plus student.json (the architecture). Sizes: the
teacher's fp32 image tower, the fp32 student, the int8 student (stored
bytes). (Named 'export_stage' before; the old name still works.)
Report: export_dir, model_bytes.{teacher_fp32, student_fp32, student_int8,
text_features}, compression.{fp32, int8}, export.{...}.
"""
from __future__ import annotations

import os
from typing import Any

import jax

from edgevl_jax.edgevl import calibration
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.export import artifact
from edgevl_jax.export import size as size_lib
from edgevl_jax.models import clip
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import metrics as metrics_lib
from edgevl_jax.run import runner
from edgevl_jax.utils import io

EXPORT_DIR = "export"


def defaults() -> config_lib.Schema:
  return dict(calibration.SCHEMA)


validate = calibration.validate


def run(config: Any, ctx: runner.Context) -> dict[str, Any]:
  """Converts the calibrated student to int8; writes it + text features."""
  out = os.path.join(ctx.workdir, EXPORT_DIR)
  os.makedirs(out, exist_ok=True)
  train_src = splits.load_source(config, "train")
  info = train_src.info
  teacher_folder = handoff.teacher_dir(config.teacher)
  teacher, t_params, tokenizer = handoff.load_teacher(teacher_folder)
  templates = (info.prompt_templates if config.prompt_ensemble
               else info.prompt_templates[:1])
  text = handoff.text_features(teacher, t_params, tokenizer,
                               info.class_names, templates)
  meta, variables, params = calibration.calibrate_student(
      config, config.student, train_src, ctx.cache)
  teacher_bytes = size_lib.teacher_image_tower_size(
      clip.load_config(teacher_folder))["bytes_fp32"]
  manifest = artifact.export_from_student(
      out, meta=meta, variables=variables, text_features=text,
      class_names=list(info.class_names), teacher_bytes=int(teacher_bytes))
  student_fp32 = size_lib.model_size({"params": params})["bytes"]
  student_int8 = int(manifest["bytes"]["student_int8"])
  if jax.process_index() == 0:
    io.atomic_write_json(os.path.join(ctx.workdir, handoff.STUDENT_FILE),
                         {**meta, "quant": "int8_static"})
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
  with metrics_lib.MetricWriter(ctx.workdir, tensorboard=False,
                                progress=False) as writer:
    writer.write(0, {"model_bytes/" + k: v
                     for k, v in report["model_bytes"].items()})
  return report
