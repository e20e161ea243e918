"""Job 'zero_shot_eval': zero-shot accuracy per modality on the test split.

Reports top-1/3/5 for the teacher, the fp32 student, the int8 student with
dynamic ranges and the int8 student with static ranges (calibrated on 2
batches of train pairs, both modalities; edgevl/calibration.py).
Prediction = argmax of softmax(100 cos(image, text)) over the prompts of
every class. (Named 'evaluate' before; the old name still works.)
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
from edgevl_jax.edgevl import calibration
from edgevl_jax.edgevl import checks
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.edgevl import zero_shot
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import metrics as metrics_lib
from edgevl_jax.run import plots
from edgevl_jax.run import runner

MODELS = ("teacher", "student_fp32", "student_int8_dynamic",
          "student_int8_static")
f = config_lib.field


def defaults() -> config_lib.Schema:
  return {
      **calibration.SCHEMA,
      **handoff.TEACHER_SCHEMA,
      "student_fp32": f("", "the fp32 student workdir ('' = student)"),
  }


def validate(config: Any) -> None:
  """Names the bad key before any compute."""
  calibration.validate(config)
  checks.normalization(config, "teacher_normalization")
  if config.student_fp32:
    checks.student_folder(config, "student_fp32")
    checks.student_fits_teacher(config, "student_fp32")


def _embedder(model: Any, variables: Any, normalization: str):
  norm = handoff.normalizer(normalization)
  return functools.partial(
      jax.jit(lambda v, x: model.apply(v, norm(x))), variables)


def run(config: Any, ctx: runner.Context) -> dict[str, Any]:
  """Zero-shot evaluation of every model on the test split."""
  test_src = splits.load_source(config, "test")
  train_src = splits.load_source(config, "train")
  info = test_src.info
  teacher, t_params, tokenizer = handoff.load_teacher(config.teacher)
  templates = (info.prompt_templates if config.prompt_ensemble
               else info.prompt_templates[:1])
  text = handoff.text_features(teacher, t_params, tokenizer,
                               info.class_names, templates)
  t_norm = handoff.normalizer(config.teacher_normalization)
  fns = {"teacher": jax.jit(lambda x: teacher.apply(
      {"params": t_params}, t_norm(x), method="encode_image"))}
  m32, v32, meta32 = handoff.student_variables(config.student_fp32
                                               or config.student)
  fns["student_fp32"] = _embedder(m32, v32, meta32["normalization"])
  mdyn, variables, meta = handoff.student_variables(config.student,
                                                    quant=quant.int8())
  fns["student_int8_dynamic"] = _embedder(mdyn, variables,
                                          meta["normalization"])
  meta, variables, _ = calibration.calibrate_student(
      config, config.student, train_src, ctx.cache)
  _, fns["student_int8_static"] = calibration.static_student(meta, variables)

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
  with metrics_lib.MetricWriter(ctx.workdir, tensorboard=False,
                                progress=False) as writer:
    writer.write(0, {f"{n}/{m}": v for n, d in top1.items()
                     for m, v in d.items()})
  if metrics_lib.is_main_process():
    plots.plot_accuracy_table(top1, os.path.join(ctx.workdir,
                                                 "zero_shot.png"))
  return {"zero_shot": top1, "zero_shot_topk": topk,
          "test_examples": int(len(emb["label"]))}
