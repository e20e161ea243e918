"""Job 'classifier': supervised image classifiers (the data-free teachers).

Trains `num_models` independently seeded classifiers of one architecture
(CDFKD-MFS: three ResNet-34s, SGD lr 0.1, momentum 0.9, weight decay 5e-4)
on a TFDS classification dataset ('image' uint8 NHWC, 'label'), one after
the other, each in WORKDIR/model_<i>/ with the runner's outputs
(checkpoints, metrics.jsonl, TensorBoard, loss.png) and classifier.json. A
re-run resumes the unfinished model and skips finished ones (their final
checkpoint restores and no step runs).
Report: accuracy.teacher_each (list), accuracy.teacher_ensemble (mean
logits), model_dirs.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from edgevl_jax import classification as cls
from edgevl_jax.models import students
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import runner
from edgevl_jax.utils import io

f = config_lib.field


def defaults() -> config_lib.Schema:
  return {
      "dataset": f("sklearn_digits", "TFDS classification dataset"),
      "data_dir": f("/tmp/tfds", "TFDS data folder"),
      "image_size": f(32, "input side (the dataset's)"),
      "model": cls.MODEL_SCHEMA,
      "num_classes": f(0, "classes (0: from the labels)"),
      "num_models": f(3, "independently seeded classifiers"),
      "batch_size": f(64, "images per step"),
      "num_epochs": f(8, "epochs per classifier"),
      "optim": optim_lib.OPTIM_SCHEMA,
      "augment": cls.AUGMENT_SCHEMA,
  }



def validate(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("num_models", "batch_size", "num_epochs"):
    config_lib.require_positive(config, key, integer=True)
  config_lib.require(config, "model.name", allowed=students.NAMES)
  optim_lib.validate_optim_config(config.optim)


def make_train_step(model: Any):
  """(state, batch) -> (state, metrics): cross-entropy, BatchNorm updated."""

  def train_step(state, batch):
    def loss_fn(params):
      logits, mutated = model.apply(
          {"params": params, **state.model_state},
          cls.normalize(batch["image"]), train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"]).mean()
      acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
      return loss, (mutated, acc)
    (loss, (mutated, acc)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads, model_state=dict(mutated))
    return state, {"loss": loss, "train_accuracy": acc}

  return train_step


def run(config: Any, ctx: runner.Context) -> dict[str, Any]:
  """Trains the classifiers; returns their test accuracies."""
  train = cls.load_dataset(config.dataset, "train", data_dir=config.data_dir)
  test = cls.load_dataset(config.dataset, "test", data_dir=config.data_dir)
  num_classes = config.num_classes or int(max(train[1].max(),
                                              test[1].max()) + 1)
  model = cls.build_model(config.model, num_classes)
  dummy = jnp.zeros((1,) + train[0].shape[1:], jnp.float32)
  # One step function for every model: compiled once.
  step = make_train_step(model)
  predict = jax.jit(model.apply)
  steps_per_epoch = len(train[0]) // config.batch_size
  all_logits, dirs = [], []
  for i in range(config.num_models):
    model_dir = os.path.join(ctx.workdir, f"model_{i}")
    batches = cls.EpochBatches(
        *train, batch_size=config.batch_size, seed=config.seed + 1000 * i,
        crop_padding=config.augment.crop_padding, flip=config.augment.flip)
    state, _ = ctx.train(runner.TrainSpec(
        init=lambda k: model.init(cls.init_key(k), dummy,
                                  mutable=["params", "batch_stats"]),
        step=step, batches=batches, seed=config.seed + 1000 * i,
        num_steps=steps_per_epoch * config.num_epochs,
        steps_per_epoch=steps_per_epoch, title=f"classifier {i}"),
        workdir=model_dir)
    logits = cls.predict_split(functools.partial(predict, state.variables),
                               test[0])
    if jax.process_index() == 0:
      io.atomic_write_json(os.path.join(model_dir, cls.MODEL_FILE), {
          "model": config_lib.to_dict(config.model),
          "num_classes": int(logits.shape[-1]),
          "test_accuracy": cls.accuracy(logits, test[1])})
    all_logits.append(logits)
    dirs.append(os.path.relpath(model_dir, ctx.workdir))
  each = [cls.accuracy(l, test[1]) for l in all_logits]
  ensemble = cls.accuracy(np.mean(all_logits, axis=0), test[1])
  return {"accuracy": {"teacher_each": each, "teacher_ensemble": ensemble},
          "model_dirs": dirs}
