"""Job 'distill_classifier': supervised KD with OFA-KD exit branches.

Distils a trained classifier (the classifier job's output) into a
student classifier on a TFDS classification dataset:

  L = ce_weight * CE(student, y)
      + kd_weight * KD(student, teacher)               (kd: 'kl' or 'ofa')
      + ofa.weight * sum_s ofa_loss(branch_s(stage_s), teacher, y)

KD 'kl' is Hinton's T^2-scaled KL; 'ofa' is OFA-KD's target-enhanced loss
(also what the branches use). Branches (`models.ofa_branches`) read the
student's intermediate stages and are dropped after training; only the
student's logits are evaluated. With `compare_without_ofa`, a second student
is trained identically but with no branches (ofa.weight = 0), so the report
shows what the branches add.

Each variant trains in WORKDIR/<variant>/ (resumable). Report:
accuracy.{teacher, student_ofa, student_kd (if compared)}, num_test.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax import classification as cls
from edgevl_jax import losses
from edgevl_jax.models import ofa_branches
from edgevl_jax.models import students
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import runner

f = config_lib.field


def defaults() -> config_lib.Schema:
  return {
      "dataset": f("sklearn_digits", "TFDS classification dataset"),
      "data_dir": f("/tmp/tfds", "TFDS data folder"),
      "teacher": f("", "a classifier model folder or classifier workdir "
                   "(its model_0)"),
      "student": cls.MODEL_SCHEMA,
      "batch_size": f(64, "images per step"),
      "num_epochs": f(10, "epochs per student"),
      "optim": optim_lib.OPTIM_SCHEMA,
      "augment": cls.AUGMENT_SCHEMA,
      "ce_weight": f(1.0, "cross-entropy weight"),
      "kd_weight": f(1.0, "KD weight"),
      "kd": f("ofa", "'kl' (Hinton, T^2-scaled) or 'ofa'"),
      "kd_temperature": f(4.0, "KL temperature"),
      "ofa": {"stages": f((1, 2, 3), "student stages with a branch (1..4)"),
              "weight": f(1.0, "branch loss weight"),
              "gamma": f(1.5, "OFA target enhancement"),
              "temperature": f(1.0, "OFA temperature")},
      "compare_without_ofa": f(True, "also train a student without "
                               "branches"),
  }



class StudentWithBranches(nn.Module):
  """A classifier student plus OFA branches on its stages.

  Returns (logits (B, K), tuple of branch logits (B, K)).
  """

  student: nn.Module
  branches: nn.Module | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    feats = self.student.features(images, train=train)
    logits = self.student.head(feats["pooled"])
    extra = () if self.branches is None else self.branches(
        feats["stages"], train=train)
    return logits.astype(jnp.float32), extra


def teacher_model_dir(path: str) -> str:
  """A classifier folder: `path` itself or `path`/model_0."""
  for candidate in (path, os.path.join(path, "model_0")):
    if os.path.exists(os.path.join(candidate, cls.MODEL_FILE)):
      return candidate
  raise ValueError(f"teacher={path!r} holds no trained classifier "
                   f"({cls.MODEL_FILE}); run the classifier job first and "
                   "pass its workdir or one model_<i> folder.")


def validate(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("batch_size", "num_epochs"):
    config_lib.require_positive(config, key, integer=True)
  config_lib.require(config, "kd", allowed=("kl", "ofa"))
  config_lib.require(config, "student.name", allowed=students.NAMES)
  stages = list(config.ofa.stages)
  if any(s not in (1, 2, 3, 4) for s in stages):
    raise ValueError(f"config.ofa.stages must be 1-based stage indices in "
                     f"1..4; found {stages}.")
  optim_lib.validate_optim_config(config.optim)
  if config.teacher and not config_lib.is_reference(config.teacher):
    teacher_model_dir(config.teacher)


def build_student(config: Any, num_classes: int, image_shape: tuple[int, ...],
                  with_branches: bool) -> StudentWithBranches:
  student = cls.build_model(config.student, num_classes)
  if not with_branches or not list(config.ofa.stages):
    return StudentWithBranches(student)
  dummy = jnp.zeros((1,) + image_shape, jnp.float32)
  shapes = jax.eval_shape(
      lambda: student.init_with_output(jax.random.key(0), dummy,
                                       method="features")[0])["stages"]
  branches = ofa_branches.OFABranches(
      tuple(tuple(s.shape) for s in shapes), tuple(config.ofa.stages),
      num_classes, num_prefix_tokens=1)
  return StudentWithBranches(student, branches)


def _losses(config: Any, logits, branch_logits, teacher_logits, labels):
  ce = losses.softmax_cross_entropy(logits=logits, labels=labels)
  if config.kd == "kl":
    kd = losses.kl_distill(logits_student=logits,
                           logits_teacher=teacher_logits,
                           temperature=config.kd_temperature)
  else:
    kd = losses.ofa_loss(logits_student=logits, logits_teacher=teacher_logits,
                         target_labels=labels, gamma=config.ofa.gamma,
                         temperature=config.ofa.temperature)
  ofa = sum((losses.ofa_loss(logits_student=b, logits_teacher=teacher_logits,
                             target_labels=labels, gamma=config.ofa.gamma,
                             temperature=config.ofa.temperature)
             for b in branch_logits), jnp.zeros(()))
  total = (config.ce_weight * ce + config.kd_weight * kd
           + config.ofa.weight * ofa)
  return total, {"loss": total, "ce_loss": ce, "kd_loss": kd,
                 "ofa_loss": ofa}


def make_train_step(config: Any, model: StudentWithBranches, t_model: Any):
  """(state, teacher_variables, batch) -> (state, metrics)."""

  def train_step(state, t_vars, batch):
    x = cls.normalize(batch["image"])
    teacher_logits = jax.lax.stop_gradient(t_model.apply(t_vars, x))

    def loss_fn(params):
      (logits, extra), mutated = model.apply(
          {"params": params, **state.model_state}, x, train=True,
          mutable=["batch_stats"])
      total, metrics = _losses(config, logits, extra, teacher_logits,
                               batch["label"])
      metrics["train_accuracy"] = jnp.mean(
          jnp.argmax(logits, -1) == batch["label"])
      return total, (mutated, metrics)

    (_, (mutated, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, model_state=dict(mutated)), metrics

  return train_step


def run(config: Any, ctx: runner.Context) -> dict[str, Any]:
  """Trains the OFA student (and the plain-KD one); returns accuracies."""
  t_model, t_vars = cls.load_classifier(teacher_model_dir(config.teacher))
  train = cls.load_dataset(config.dataset, "train", data_dir=config.data_dir)
  test = cls.load_dataset(config.dataset, "test", data_dir=config.data_dir)
  t_logits = cls.predict_split(jax.jit(lambda x: t_model.apply(t_vars, x)),
                               test[0])
  num_classes = int(t_logits.shape[-1])
  report = {"accuracy": {"teacher": cls.accuracy(t_logits, test[1])}}
  t_vars = jax.device_put(t_vars, mesh_lib.replicated(ctx.mesh))
  variants = [("student_ofa", True)]
  if config.compare_without_ofa:
    variants.append(("student_kd", False))
  dummy = jnp.zeros((1,) + train[0].shape[1:], jnp.float32)
  for name, with_branches in variants:
    model = build_student(config, num_classes, train[0].shape[1:],
                          with_branches)
    batches = cls.EpochBatches(
        *train, batch_size=config.batch_size, seed=config.seed,
        crop_padding=config.augment.crop_padding, flip=config.augment.flip)
    state, _ = ctx.train(runner.TrainSpec(
        init=functools.partial(lambda m, k: m.init(
            k, dummy, mutable=["params", "batch_stats"]), model),
        step=make_train_step(config, model, t_model), batches=batches,
        aux=(t_vars,), aux_shardings=(mesh_lib.replicated(ctx.mesh),),
        num_steps=batches.steps_per_epoch * config.num_epochs,
        steps_per_epoch=batches.steps_per_epoch, title=name),
        workdir=os.path.join(ctx.workdir, name))
    predict = jax.jit(lambda v, x, m=model: m.apply(v, x)[0])
    report["accuracy"][name] = cls.accuracy(
        cls.predict_split(functools.partial(predict, state.variables),
                          test[0]), test[1])
  report["num_test"] = int(len(test[1]))
  return report
