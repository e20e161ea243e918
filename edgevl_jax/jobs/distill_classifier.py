"""Trainer 'distill_classifier': supervised KD with OFA-KD exit branches.

Distils a trained classifier (the 'classifier' trainer's output) into a
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

Config keys: dataset, data_dir, teacher (a classifier model folder or a
'classifier' workdir: its model_0 is used), student.{name, overrides},
batch_size, num_epochs, optim, augment.{crop_padding, flip}, ce_weight,
kd_weight, kd ('kl' | 'ofa'), kd_temperature, ofa.{stages, weight, gamma,
temperature}, compare_without_ofa, seed, log_every, ckpt_every.
Each variant trains in WORKDIR/<variant>/ (resumable). Report:
accuracy.{teacher, student_ofa, student_kd (if compared)}.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax import losses
from edgevl_jax.models import ofa_branches
from edgevl_jax.models import students
from edgevl_jax.train import checkpoint as checkpoint_lib
from edgevl_jax.train import classifier
from edgevl_jax.train import config_utils
from edgevl_jax.train import loop
from edgevl_jax.train import mesh as mesh_lib
from edgevl_jax.train import metrics as metrics_lib
from edgevl_jax.train import state as state_lib


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
    if os.path.exists(os.path.join(candidate, classifier.MODEL_FILE)):
      return candidate
  raise ValueError(f"teacher={path!r} holds no trained classifier "
                   f"({classifier.MODEL_FILE}); run the 'classifier' trainer "
                   "first and pass its workdir or one model_<i> folder.")


def validate_config(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("dataset", "data_dir", "teacher", "student.name"):
    config_utils.require(config, key)
  for key in ("batch_size", "num_epochs"):
    config_utils.require_positive(config, key, integer=True)
  config_utils.require(config, "kd", allowed=("kl", "ofa"))
  if config.student.name not in students.NAMES:
    raise ValueError(f"config.student.name={config.student.name!r} is not a "
                     f"student backbone; choose one of {students.NAMES}.")
  stages = list(config.ofa.stages)
  if any(s not in (1, 2, 3, 4) for s in stages):
    raise ValueError(f"config.ofa.stages must be 1-based stage indices in "
                     f"1..4; found {stages}.")
  state_lib.validate_optim_config(config.optim)


def build_student(config: Any, num_classes: int, image_shape: tuple[int, ...],
                  with_branches: bool) -> StudentWithBranches:
  overrides = dict(config_utils.get(config, "student.overrides", None) or {})
  student = students.build(config.student.name, embed_dim=num_classes,
                           **overrides)
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


def train_variant(config: Any, model: StudentWithBranches, teacher: Any,
                  train: tuple, test: tuple, workdir: str,
                  mesh: jax.sharding.Mesh) -> float:
  """Trains one student in `workdir`; returns its test accuracy."""
  t_model, t_vars = teacher
  images, labels = train
  batches = classifier.EpochBatches(
      images, labels, batch_size=config.batch_size, seed=int(config.seed),
      crop_padding=int(config_utils.get(config, "augment.crop_padding", 0)),
      flip=bool(config_utils.get(config, "augment.flip", False)))
  num_steps = batches.steps_per_epoch * config.num_epochs
  tx = state_lib.make_optimizer(config.optim, num_steps)
  dummy = jnp.zeros((1,) + images.shape[1:], jnp.float32)
  state, state_sh = state_lib.create_train_state(
      lambda k: model.init(k, dummy, mutable=["params", "batch_stats"]), tx,
      jax.random.PRNGKey(int(config.seed)), mesh=mesh)

  def train_step(state, batch):
    x = classifier.normalize(batch["image"])
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

  step = mesh_lib.jit_sharded(
      train_step, in_shardings=(state_sh, mesh_lib.batch_sharding(mesh)),
      out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.get("max_to_keep", checkpoint_lib.DEFAULT_MAX_TO_KEEP)) as ckpt, \
      metrics_lib.MetricWriter(workdir, total_steps=num_steps,
                               tensorboard=False) as writer:
    state, _ = loop.fit(
        state, step, batches, num_steps=num_steps, checkpointer=ckpt,
        writer=writer, log_every=int(config_utils.get(config, "log_every", 50)),
        ckpt_every=config_utils.get(config, "ckpt_every", None),
        prepare_batch=functools.partial(mesh_lib.shard_batch, mesh=mesh))
  predict = jax.jit(lambda x: model.apply(state.variables, x)[0])
  return classifier.accuracy(classifier.evaluate(predict, *test), test[1])


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains the OFA student (and the plain-KD one); returns accuracies."""
  validate_config(config)
  mesh = mesh_lib.make_mesh(config_utils.get(config, "mesh", None))
  teacher = classifier.load_classifier(teacher_model_dir(config.teacher))
  train = classifier.load_dataset(config.dataset, "train",
                                  data_dir=config.data_dir)
  test = classifier.load_dataset(config.dataset, "test",
                                 data_dir=config.data_dir)
  t_predict = jax.jit(lambda x: teacher[0].apply(teacher[1], x))
  t_logits = classifier.evaluate(t_predict, *test)
  num_classes = int(t_logits.shape[-1])
  report = {"accuracy": {"teacher": classifier.accuracy(t_logits, test[1])}}
  variants = [("student_ofa", True)]
  if config.get("compare_without_ofa", False):
    variants.append(("student_kd", False))
  for name, with_branches in variants:
    model = build_student(config, num_classes, train[0].shape[1:],
                          with_branches)
    report["accuracy"][name] = train_variant(
        config, model, teacher, train, test, os.path.join(workdir, name),
        mesh)
  report["num_test"] = int(len(test[1]))
  return report
