"""Trainer 'evaluate': zero-shot accuracy per modality on the test split.

Reports top-1/3/5 for the teacher, the fp32 student, the int8 student with
dynamic ranges and the int8 student with static ranges (calibrated on 2
batches of train pairs, both modalities). Prediction = argmax of
softmax(100 cos(image, text)) over the prompts of every class.

Config keys: dataset, data_dir, data_config, teacher, teacher_normalization,
student (final, quantisation-aware student workdir), student_fp32 (fp32
student workdir; default: student), pseudo_labels (calibration subset; ''
= whole train split), image_size, calibration_batch_size (32),
calibration_batches (2), crop_scale, eval_batch_size, seed,
prompt_ensemble.
Report: zero_shot.{teacher, student_fp32, student_int8_dynamic,
student_int8_static}.{rgb, <other>} (top-1) and zero_shot_topk with
top1/top3/top5 for each.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax

from edgevl_jax import quant
from edgevl_jax.eval import artefacts
from edgevl_jax.eval import quantized
from edgevl_jax.eval import splits
from edgevl_jax.eval import zero_shot
from edgevl_jax.train import checks
from edgevl_jax.train import config_utils
from edgevl_jax.train import dual_modality_kd as kd
from edgevl_jax.train import metrics as metrics_lib

MODELS = ("teacher", "student_fp32", "student_int8_dynamic",
          "student_int8_static")


def validate_config(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("dataset", "data_dir", "teacher", "student"):
    config_utils.require(config, key, types=str)
  for key in ("image_size", "calibration_batch_size", "calibration_batches",
              "eval_batch_size"):
    config_utils.require_positive(config, key, integer=True)
  config_utils.require(config, "teacher_normalization",
                       allowed=("clip", "imagenet"))
  checks.dataset(config)
  checks.seed(config)
  checks.teacher_folder(config)
  checks.student_folder(config, "student")
  checks.student_fits_teacher(config, "student")
  if config_utils.get(config, "student_fp32"):
    checks.student_folder(config, "student_fp32")


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Zero-shot evaluation of every model on the test split."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  test_src = splits.load_source(config, "test")
  train_src = splits.load_source(config, "train")
  info = test_src.info
  teacher, t_params, tokenizer = artefacts.load_teacher(config.teacher)
  templates = (info.prompt_templates if config.get("prompt_ensemble", False)
               else info.prompt_templates[:1])
  text = artefacts.text_features(teacher, t_params, tokenizer,
                                 info.class_names, templates)
  t_norm = artefacts.normalizer(config.teacher_normalization)
  fns = {"teacher": jax.jit(lambda x: teacher.apply(
      {"params": t_params}, t_norm(x), method="encode_image"))}

  fp32_path = config.get("student_fp32", "") or config.student
  m32, p32, meta32 = artefacts.load_student(fp32_path)
  n32 = artefacts.normalizer(meta32["normalization"])
  fns["student_fp32"] = functools.partial(
      jax.jit(lambda p, x: m32.apply({"params": p}, n32(x))), p32)
  mdyn, params, meta = artefacts.load_student(config.student,
                                              quant=quant.int8())
  norm = artefacts.normalizer(meta["normalization"])
  fns["student_int8_dynamic"] = functools.partial(
      jax.jit(lambda p, x: mdyn.apply({"params": p}, norm(x))), params)
  indices, _ = kd.curated_subset(config)
  calib = quantized.calibration_inputs(
      train_src, normalization=meta["normalization"],
      image_size=config.image_size,
      batch_size=config.calibration_batch_size,
      num_batches=config.calibration_batches, seed=config.seed,
      indices=indices, crop_scale=tuple(config.crop_scale))
  _, _, fns["student_int8_static"] = quantized.static_student(
      meta, params, calib)

  emb = splits.embed_split(fns, test_src, image_size=config.image_size,
                           batch_size=config.eval_batch_size)
  other = info.other_modality
  top1, topk = {}, {}
  for name in MODELS:
    top1[name], topk[name] = {}, {}
    for m, key in (("rgb", "rgb"), ("other", other)):
      acc = zero_shot.topk_accuracy(emb[name][m], text, emb["label"])
      top1[name][key] = acc["top1"]
      topk[name][key] = acc
  with metrics_lib.MetricWriter(workdir, tensorboard=False,
                                progress=False) as writer:
    writer.write(0, {f"{n}/{m}": v for n, d in top1.items()
                     for m, v in d.items()})
  metrics_lib.plot_accuracy_table(top1, os.path.join(workdir,
                                                     "zero_shot.png"))
  return {"zero_shot": top1, "zero_shot_topk": topk,
          "test_examples": int(len(emb["label"]))}
