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

The ONNX edge artefact (export.onnx_export) goes to WORKDIR/export_onnx/:
student_fp32.onnx, student_int8_s8s8.onnx, student_int8_u8.onnx,
text_features.npy, manifest.json. It is run by ONNX Runtime on the test
split, next to the in-framework static int8 student:
edge.{onnx_dir, onnx_fp32_bytes, onnx_int8_bytes, served_int8_bytes,
cosine_to_fake_quant, zero_shot_onnx_int8.{rgb, <other>},
zero_shot_int8_static.{rgb, <other>}}. Process 0 alone writes the folder
and computes these (the other processes neither write nor read it, and
their report has no `edge`).
"""
from __future__ import annotations

import os
from typing import Any

import jax

from edgevl_jax.edgevl import calibration
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.edgevl import zero_shot
from edgevl_jax.export import artifact
from edgevl_jax.export import edge_predict
from edgevl_jax.export import onnx_export
from edgevl_jax.export import size as size_lib
from edgevl_jax.models import clip
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import metrics as metrics_lib
from edgevl_jax.run import runner
from edgevl_jax.utils import io

EXPORT_DIR = "export"
ONNX_DIR = "export_onnx"
EDGE_BATCH = 64


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
  if jax.process_index() == 0:
    report["edge"] = _edge(config, ctx, meta=meta, variables=variables,
                           text=text, class_names=list(info.class_names))
  with metrics_lib.MetricWriter(ctx.workdir, tensorboard=False,
                                progress=False) as writer:
    writer.write(0, {"model_bytes/" + k: v
                     for k, v in report["model_bytes"].items()})
  return report


def _edge(config: Any, ctx: runner.Context, *, meta: dict[str, Any],
          variables: dict[str, Any], text: Any,
          class_names: list[str]) -> dict[str, Any]:
  """Writes the ONNX artefact; its int8 zero-shot on test (process 0 only)."""
  out = os.path.join(ctx.workdir, ONNX_DIR)
  served = artifact.convert_static(meta, variables)
  fp32 = {k: v for k, v in variables.items()
          if k in ("params", "batch_stats")}
  manifest = onnx_export.export_onnx(
      out, meta=meta, params=fp32, served=served, text_features=text,
      class_names=class_names,
      served_bytes=size_lib.model_size(served)["bytes"])
  onnx_int8 = edge_predict.load(out, model="int8_u8")
  _, fake_quant = calibration.static_student(meta, variables)
  test_src = splits.load_source(config, "test")
  other = test_src.info.other_modality
  emb = splits.embed_split(
      {"onnx_int8": onnx_int8.embed, "int8_static": fake_quant}, test_src,
      image_size=config.image_size, batch_size=EDGE_BATCH)
  cosines = [zero_shot.normalize_rows(emb["onnx_int8"][m]) *
             zero_shot.normalize_rows(emb["int8_static"][m])
             for m in ("rgb", "other")]
  cosines = [c.sum(-1) for c in cosines]
  accuracy = {name: {key: float(zero_shot.topk_accuracy(
      emb[name][m], text, emb["label"])["top1"])
                     for m, key in (("rgb", "rgb"), ("other", other))}
              for name in ("onnx_int8", "int8_static")}
  return {"onnx_dir": ONNX_DIR,
          "onnx_fp32_bytes": int(manifest["bytes"]["onnx_fp32"]),
          "onnx_int8_bytes": int(manifest["bytes"]["onnx_int8"]),
          "served_int8_bytes": int(manifest["bytes"]["served_int8"]),
          "cosine_to_fake_quant": float(min(c.min() for c in cosines)),
          "cosine_to_fake_quant_mean": float(
              sum(c.sum() for c in cosines) / sum(c.size for c in cosines)),
          "zero_shot_onnx_int8": accuracy["onnx_int8"],
          "zero_shot_int8_static": accuracy["int8_static"]}
