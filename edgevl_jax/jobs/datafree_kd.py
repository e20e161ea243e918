"""Job 'datafree_kd': collaborative data-free distillation (CDFKD-MFS).

H frozen teachers (trained by the classifier job) are distilled into one
multi-header student (models/multihead.py) using only images from a
generator trained adversarially against the student (datafree/iteration.py:
`student_steps` student updates then one generator update per iteration).
Teachers run in inference mode and sow the moments of every BatchNorm input
for the BN-statistics loss. The iteration is jitted with explicit
shardings: as one function on accelerators, as a jitted student update
called `student_steps` times plus a jitted generator update on CPU.

No real training image is used, except (optionally) `attention.fraction` of
the training set at the end to fit the attention aggregation with the
student frozen. The test split is used for evaluation only.
Workdir: the runner's outputs (checkpoints hold student + generator + both
optimiser states + rng as one pytree), samples.png (generated images).
Report: accuracy.{teacher_ensemble, teacher_each, student_mean_heads,
student_each_head, student_attention}, iterations, samples_path, train.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from edgevl_jax import classification as cls
from edgevl_jax.datafree import attention
from edgevl_jax.datafree import iteration
from edgevl_jax.datafree import teachers as teachers_lib
from edgevl_jax.models import generator as generator_lib
from edgevl_jax.models import multihead
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import runner
from edgevl_jax.run import evaluators

SAMPLES_FILE = "samples.png"
f = config_lib.field


def defaults() -> config_lib.Schema:
  return {
      "dataset": f("sklearn_digits", "real dataset (evaluation only)"),
      "data_dir": f("/tmp/tfds", "TFDS data folder"),
      "teachers_dir": f("", "a classifier-job workdir (its model_*)"),
      "batch_size": f(64, "generated images per update"),
      "epochs": f(8, "epochs of iters_per_epoch iterations"),
      "iters_per_epoch": f(20, "iterations per epoch"),
      "student_steps": f(5, "student updates per iteration"),
      "student": {"trunk": f("resnet18", "multi-head student trunk"),
                  "overrides": f({}, "trunk fields")},
      "generator": {"image_size": f(32, "32, 128 or 224"),
                    "overrides": f({}, "generator fields (e.g. ngf)")},
      "student_optim": optim_lib.OPTIM_SCHEMA,
      "generator_optim": optim_lib.OPTIM_SCHEMA,
      "loss": {"w_feat": f(0.2, "feature (MFS) loss weight"),
               "w_ens": f(5.0, "ensemble-logit loss weight"),
               "w_bn": f(0.1, "BN-statistics loss weight"),
               "bn_first_weight": f(5.0, "weight of the first BN layer")},
      "attention": {"enabled": f(True, "fit the attention aggregation"),
                    "fraction": f(0.01, "share of real train images used"),
                    "steps": f(200, "Adam steps"),
                    "lr": f(1e-2, "Adam learning rate")},
      "fused_iteration": f(None, "one jitted iteration (default: not on "
                           "CPU)", bool),
  }



def validate(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("batch_size", "epochs", "iters_per_epoch", "student_steps"):
    config_lib.require_positive(config, key, integer=True)
  config_lib.require(config, "generator.image_size", allowed=(32, 128, 224))
  for name in ("student_optim", "generator_optim"):
    optim_lib.validate_optim_config(config[name], prefix=name)
    for m in list(config[name].milestones or ()):
      if not 0 < m < config.epochs:
        raise ValueError(f"config.{name}.milestones are epochs in (0, "
                         f"{config.epochs}); found {m}.")


def build(config: Any, ctx: runner.Context) -> runner.TrainSpec:
  """Data-free distillation, then evaluation on the real test split."""
  mesh = ctx.mesh
  teacher, teacher_vars, teacher_dirs = teachers_lib.load_teachers(
      config.teachers_dir)
  num_classes = int(jax.tree.leaves(
      teacher_vars["params"]["head"])[0].shape[-1])
  student = multihead.build(config.student.trunk,
                            num_heads=len(teacher_dirs),
                            num_classes=num_classes,
                            **dict(config.student.overrides))
  gen = generator_lib.build(config.generator.image_size,
                            **dict(config.generator.overrides))
  state, state_sh = iteration.create_state(config, student, gen, mesh)
  rep = mesh_lib.replicated(mesh)
  teacher_vars = jax.device_put(teacher_vars, rep)
  step = iteration.compile_iteration(
      config, iteration.make_steps(config, student, gen, teacher, mesh),
      state_sh, mesh)
  test_images, test_labels = cls.load_dataset(
      config.dataset, "test", data_dir=config.data_dir)
  t_apply = jax.jit(lambda v, x: teachers_lib.teachers_forward(
      teacher, v, x)[0])
  t_logits = cls.predict_split(functools.partial(t_apply, teacher_vars),
                               test_images)
  s_apply = jax.jit(lambda v, x: student.apply(v, x)["head_logits"])

  def head_logits(st) -> np.ndarray:
    return cls.predict_split(functools.partial(s_apply, st.student.variables),
                             test_images)

  def evaluate(st) -> dict[str, float]:
    logits = head_logits(st)
    return {"student_accuracy": cls.accuracy(logits.mean(0), test_labels),
            "test_agreement": float(np.mean(
                logits.mean(0).argmax(-1) == t_logits.mean(0).argmax(-1)))}

  def report(st, summary):
    s_logits = head_logits(st)
    z = jax.random.normal(jax.random.key(config.seed + 1), (64, gen.nz))
    if jax.process_index() == 0:
      generator_lib.save_samples(
          os.path.join(ctx.workdir, SAMPLES_FILE),
          np.asarray(generator_lib.sample(gen, st.generator.variables, z)))
    acc = {
        "teacher_each": [cls.accuracy(l, test_labels) for l in t_logits],
        "teacher_ensemble": cls.accuracy(t_logits.mean(0), test_labels),
        "student_mean_heads": cls.accuracy(s_logits.mean(0), test_labels),
        "student_each_head": [cls.accuracy(l, test_labels)
                              for l in s_logits]}
    out = {"accuracy": acc, "iterations": int(st.step),
           "samples_path": SAMPLES_FILE,
           "train": {k: v for k, v in summary.items()
                     if isinstance(v, (int, float))},
           "student_over_teacher_ensemble": acc["student_mean_heads"] / max(
               acc["teacher_ensemble"], 1e-9)}
    if config.attention.enabled:
      train_images, train_labels = cls.load_dataset(
          config.dataset, "train", data_dir=config.data_dir)
      train_logits = cls.predict_split(
          functools.partial(s_apply, st.student.variables), train_images)
      acc["student_attention"], out["attention_real_samples"] = (
          attention.fit_attention(config, train_logits, train_labels,
                                  s_logits, test_labels))
    return out

  return runner.TrainSpec(
      state=(state, state_sh), step=step, jitted=True, aux=(teacher_vars,),
      batches=None, num_steps=config.epochs * config.iters_per_epoch,
      # Evaluated every config.eval_every iterations and at the end.
      evaluators=[evaluators.FunctionEvaluator(evaluate)],
      report=report, title="CDFKD-MFS")
