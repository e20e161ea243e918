"""Job 'qat_contrastive': EdgeVL stage 2, quantisation-aware contrastive.

Starts from the stage-1 student (`init_from`) rebuilt with int8 AQT fake
quantisation (dynamic ranges, STE); the params tree is the fp32 one, so the
stage-1 params load unchanged. No teacher in the step (it gives the
validation text features). Positives share the teacher's pseudo-label,
negatives do not.

mining='offline' (paper): every epoch the current student mines semi-hard
triplets over the curated RGB train images (edgevl/triplet_mining.py) and
the groups are reloaded with fresh augmentation in both modalities; the
loss is the triplet margin loss within each modality, summed over
modalities. mining='online': plain curated pair batches, semi-hard mining
inside the batch (`losses.online_semi_hard_triplet_loss`).

The public code's defects are fixed: mining uses the loss's normalised space
(`mining_space='unnormalized'` restores the original), gradients are fresh
every step (no accumulation), the student is in train mode.
Report: student_path, qat.{best_val_top1_rgb, best_val_top1_<other>,
best_step, loss, triplets_first_epoch}.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from edgevl_jax import data as data_lib
from edgevl_jax import losses
from edgevl_jax import quant
from edgevl_jax.edgevl import checks
from edgevl_jax.edgevl import curation
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.edgevl import student_spec
from edgevl_jax.edgevl import triplet_mining
from edgevl_jax.edgevl import validation
from edgevl_jax.models import students
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import runner

MINING = ("offline", "online")
QUANT = {"int8": quant.int8, "none": None}
f = config_lib.field


def defaults() -> config_lib.Schema:
  return {
      **splits.DATA_SCHEMA,
      "init_from": f("", "the stage-1 (dual_modality_kd) workdir"),
      "teacher": f("", "HF CLIP folder (validation text features)"),
      "pseudo_labels": f("", "pseudo_labels workdir (positives/negatives)"),
      "image_size": f(224, "input side S"),
      "batch_size": f(4, "anchors (offline: triplet groups) per step"),
      **curation.STAGE_SCHEMA,
      "num_steps": f(100, "optimiser steps"),
      "optim": optim_lib.OPTIM_SCHEMA,
      "crop_scale": f((0.08, 1.0), "random resized crop scale range"),
      "margin": f(0.3, "triplet margin"),
      "max_negatives": f(3, "negatives per anchor (offline mining)"),
      "mining": f("offline", f"one of {MINING}"),
      "mining_space": f("normalized",
                        f"one of {triplet_mining.MINING_SPACES}"),
      "quant": f("int8", f"one of {tuple(QUANT)}"),
  }



def validate(config: Any) -> None:
  """Names the bad key before any compute."""
  checks.common_edgevl(config)
  curation.validate_stage(config)
  checks.positive_ints(config, "num_steps", "max_negatives")
  config_lib.require_positive(config, "margin")
  config_lib.require(config, "mining", allowed=MINING)
  config_lib.require(config, "mining_space",
                     allowed=triplet_mining.MINING_SPACES)
  config_lib.require(config, "quant", allowed=tuple(QUANT))
  optim_lib.validate_optim_config(config.optim)
  checks.teacher_folder(config)
  checks.student_folder(config, "init_from")
  checks.student_fits_teacher(config, "init_from")
  checks.batch_fits_devices(
      config, minimum=2 if config.mining == "online" else 1,
      what="anchors (online mining needs a positive and a negative)")
  if config.mining == "online" and config.mining_space != "normalized":
    raise ValueError("config.mining_space='unnormalized' only applies to "
                     "mining='offline'; online mining works in the loss's "
                     "normalised space.")


def quant_spec(name: str) -> Any:
  factory = QUANT[name]
  return None if factory is None else factory()


def make_train_step(model: Any, norm: Any, *, margin: float, online: bool):
  """(state, batch) -> (state, metrics), to be jitted.

  Offline batches: 'rgb', 'other' (B, 2 + K, S, S, 3), 'mask' (B, 2 + K).
  Online batches: 'rgb', 'other' (B, S, S, 3), 'pseudo_label' (B,).
  Gradients are computed afresh each step; the student runs in train mode.
  """

  def train_step(state, batch):
    key = state.step_key("dropout")
    embed_train = lambda params, images: student_spec.train_apply(
        model, params, state.model_state, norm(images), key=key)
    if online:
      x = jnp.concatenate([batch["other"], batch["rgb"]])
      labels = batch["pseudo_label"]

      def loss_fn(params):
        e, model_state = embed_train(params, x)
        e = e.reshape(2, labels.shape[0], -1)
        return sum(losses.online_semi_hard_triplet_loss(
            embeddings=e[m], labels=labels, margin=margin)
                   for m in range(2)), model_state
    else:
      b, g = batch["mask"].shape
      s = batch["rgb"].shape[2:]
      x = jnp.concatenate([batch["other"].reshape((b * g,) + s),
                           batch["rgb"].reshape((b * g,) + s)])

      def loss_fn(params):
        e, model_state = embed_train(params, x)
        return losses.dual_modality_triplet_loss(
            embeddings=e.reshape(2, b, g, -1), mask=batch["mask"],
            margin=margin), model_state
    (loss, model_state), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    gnorm = optax.global_norm(grads)
    return (state.apply_gradients(grads, model_state=model_state),
            {"loss": loss, "grad_norm": gnorm})

  return train_step


def build(config: Any, ctx: runner.Context) -> runner.TrainSpec:
  """Stage 2: int8 QAT with semi-hard triplets on pseudo-labels."""
  mesh = ctx.mesh
  train_src = splits.load_source(config, "train")
  val_src = splits.load_source(config, "validation")
  info = train_src.info
  _, init_variables, meta = handoff.student_variables(config.init_from)
  # Re-parameterisable students (GhostNetV3) are folded before QAT.
  overrides, init_variables = students.deploy_form(
      meta["name"], dict(meta.get("overrides") or {}), init_variables)
  meta = {**meta, "overrides": overrides}
  model = handoff.build_student(meta, quant_spec(config.quant))
  if int(meta["image_size"]) != config.image_size:
    raise ValueError(f"config.image_size={config.image_size} differs from the "
                     f"stage-1 student's image_size={meta['image_size']}.")
  teacher, t_params, tokenizer = handoff.load_teacher(config.teacher)
  text = handoff.text_features(teacher, t_params, tokenizer,
                               info.class_names, info.prompt_templates[:1])
  del teacher, t_params
  indices, plabels = curation.curated_subset(config.pseudo_labels,
                                             config.kept_fraction)
  schedule = curation.stage_schedule(
      config, len(train_src) if indices is None else len(indices))
  norm = handoff.normalizer(meta["normalization"])
  online = config.mining == "online"
  crop = tuple(config.crop_scale)
  local_batch = mesh_lib.per_process_batch(config.batch_size)
  live = {}
  if online:
    keys = ("rgb", "other", "pseudo_label")
    batches = iter(data_lib.paired_loader(
        train_src, batch_size=local_batch, image_size=config.image_size,
        train=True, seed=config.seed, indices=indices, pseudo_labels=plabels,
        crop_scale=crop))
  else:
    keys = ("rgb", "other", "mask")
    embed_eval = jax.jit(lambda v, x: model.apply(v, norm(x)))
    mine_fn = lambda variables, epoch: triplet_mining.mine(
        functools.partial(embed_eval, variables), train_src, indices=indices,
        pseudo_labels=plabels, image_size=config.image_size,
        batch_size=config.eval_batch_size, margin=float(config.margin),
        max_negatives=config.max_negatives, seed=config.seed * 104729 + epoch,
        mining_space=config.mining_space)
    # The iterator mines with the live params at each epoch start.
    batches = triplet_mining.EpochTriplets(
        mine_fn=mine_fn, current_params=lambda: live["state"].variables,
        make_loader=triplet_mining.make_triplet_loader(
            train_src, seed=config.seed, batch_size=local_batch,
            image_size=config.image_size, crop_scale=crop),
        batch_size=local_batch, workdir=ctx.workdir)
  best = validation.keep_best_student(ctx.workdir,
                                      {**meta, "quant": config.quant})

  def report(state, summary):
    del state
    first = getattr(batches, "num_triplets", [])
    return {"student_path": ".",
            "qat": {**validation.best_report(best, info.other_modality),
                    "loss": summary.get("loss"), **schedule,
                    "triplets_first_epoch": first[0] if first else None}}

  return runner.TrainSpec(
      init=lambda k: init_variables,
      step=make_train_step(model, norm, margin=float(config.margin),
                           online=online),
      batches=batches, num_steps=schedule["num_steps"],
      steps_per_epoch=schedule["steps_per_epoch"],
      prepare=lambda b: mesh_lib.shard_batch({k: b[k] for k in keys}, mesh),
      rules=mesh_lib.REPLICATED_RULES,
      evaluators=[validation.ZeroShotValidation(
          model.apply, val_src, text, image_size=config.image_size,
          batch_size=config.eval_batch_size,
          normalization=meta["normalization"])],
      keep_best=best, on_state=lambda s: live.update(state=s),
      report=report, title="QAT contrastive")
