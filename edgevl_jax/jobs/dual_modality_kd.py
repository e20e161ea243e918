"""Job 'dual_modality_kd': EdgeVL stage 1, distilling CLIP into a student.

Per step, B co-registered pairs of the curated subset (the same crop and flip
on both images): the frozen teacher embeds the RGB images, the student embeds
the 2B images [non-RGB; RGB] in one forward pass, and both halves are pulled
to [t; t] (`losses.dual_modality_kd_loss`, L1 by default). Ablations:
`student_inputs='rgb'` or `'other'` feed one modality only (target still the
RGB teacher). With `teacher_cache.num_views > 0` the teacher embeddings of K
fixed views are precomputed once (edgevl/teacher_cache.py) and steps run
the student only.

Memory (the paper batch of 32 pairs with a ViT-B/16 teacher on a 16 GB
accelerator): `compute_dtype='bfloat16'` runs teacher and student forward
passes in bfloat16 (params, losses and the optimiser stay float32),
`teacher_param_dtype='bfloat16'` stores the frozen teacher in bfloat16,
`grad_accum=N` splits each step into N micro-batches (same update as the
full batch), `remat=True` recomputes the student blocks' activations in the
backward pass (ViT and Swin students). benchmarks/stage1_memory.py reports
the compiled step's memory for each.

Sharding: the batch is split over ('data', 'fsdp'), the student is
replicated or fsdp-sharded (`student_sharding`), the teacher is fsdp-sharded
from its logical axes. Model selection: zero-shot top-1 on the validation
split (mean of both modalities), never on test; the selected student is the
stage's hand-off (student.json + student_params.msgpack).
Report: student_path, kd.{best_val_top1_rgb, best_val_top1_<other>,
best_step, loss, kept_examples, num_steps, steps_per_epoch, epochs,
examples}.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from edgevl_jax import data as data_lib
from edgevl_jax import losses
from edgevl_jax.edgevl import checks
from edgevl_jax.edgevl import curation
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.edgevl import student_spec
from edgevl_jax.edgevl import teacher_cache
from edgevl_jax.edgevl import validation
from edgevl_jax.models import layers
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import runner

STUDENT_INPUTS = ("both", "rgb", "other")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Student families whose blocks can be rematerialised.
REMAT_FAMILIES = ("vit", "swin")
f = config_lib.field


def defaults() -> config_lib.Schema:
  return {
      **splits.DATA_SCHEMA,
      **handoff.TEACHER_SCHEMA,
      "student": student_spec.SCHEMA,
      "pseudo_labels": f("", "pseudo_labels workdir ('' = whole train "
                         "split)"),
      "image_size": f(224, "input side S"),
      "batch_size": f(32, "pairs per step (global)"),
      **curation.STAGE_SCHEMA,
      "num_steps": f(1000, "optimiser steps"),
      "optim": optim_lib.OPTIM_SCHEMA,
      "crop_scale": f((0.08, 1.0), "random resized crop scale range"),
      "kd_loss": f("l1", f"distance, one of {losses.distill.KD_KINDS}"),
      "student_inputs": f("both", f"one of {STUDENT_INPUTS}"),
      "teacher_cache": {"num_views": f(0, "precomputed teacher views K (0: "
                                       "run the teacher every step)")},
      "student_sharding": f("replicated", "'replicated' or 'fsdp'"),
      "compute_dtype": f("float32", f"forward dtype of teacher and student, "
                         f"one of {tuple(DTYPES)} (params, losses and "
                         "optimiser stay float32)"),
      "teacher_param_dtype": f("float32", "storage dtype of the frozen "
                               f"teacher params, one of {tuple(DTYPES)}"),
      "grad_accum": f(1, "micro-batches per step (batch_size / grad_accum "
                      "must split over the devices); same update as the "
                      "full batch"),
      "remat": f(False, "recompute the student blocks' activations in the "
                 f"backward pass (students {REMAT_FAMILIES})"),
  }



def validate(config: Any) -> None:
  """Names the bad key before any compute."""
  config_lib.require(config, "kd_loss", allowed=losses.distill.KD_KINDS)
  config_lib.require(config, "student_inputs", allowed=STUDENT_INPUTS)
  config_lib.require(config, "student_sharding",
                     allowed=("replicated", "fsdp"))
  config_lib.require(config, "teacher_cache.num_views", types=int,
                     check=lambda v: v >= 0, expected=">= 0")
  checks.normalization(config, "teacher_normalization")
  checks.common_edgevl(config)
  curation.validate_stage(config)
  checks.positive_ints(config, "num_steps", "grad_accum")
  config_lib.require(config, "compute_dtype", allowed=tuple(DTYPES))
  config_lib.require(config, "teacher_param_dtype", allowed=tuple(DTYPES))
  if config.batch_size % config.grad_accum:
    raise ValueError(f"config.batch_size={config.batch_size} does not split "
                     f"into config.grad_accum={config.grad_accum} equal "
                     "micro-batches.")
  if config.remat and not config.student.name.startswith(REMAT_FAMILIES):
    raise ValueError(f"config.remat=True: student {config.student.name!r} "
                     f"has no rematerialisable blocks (families "
                     f"{REMAT_FAMILIES}); set remat=False.")
  checks.teacher_folder(config)
  checks.batch_fits_devices(config)
  student_spec.validate_student(config)
  optim_lib.validate_optim_config(config.optim)


def student_inputs(other: jax.Array, rgb: jax.Array, mode: str) -> jax.Array:
  """[non-RGB; RGB] (2B, ...), or one modality (B, ...) for the ablations."""
  if mode == "both":
    return jnp.concatenate([other, rgb])
  return rgb if mode == "rgb" else other


def _encode_teacher(teacher, t_norm, tp, rgb):
  return teacher.apply({"params": tp}, t_norm(rgb),
                       method="encode_image").astype(jnp.float32)


def make_train_step(model: Any, teacher: Any, *, kind: str, mode: str,
                    t_norm: Any, s_norm: Any, grad_accum: int = 1):
  """(state, teacher_params, batch) -> (state, metrics), to be jitted.

  batch: 'rgb', 'other' (B, S, S, 3) in [0, 1], and optionally 'teacher'
  (B, D) cached teacher embeddings (then the teacher is not run).
  grad_accum: micro-batches of B / grad_accum pairs (teacher and student
  run per micro-batch; gradients averaged: the full-batch update).
  """

  def train_step(state, tp, batch):
    key = state.step_key("dropout")

    def loss_fn(params, mb, model_state, index):
      if "teacher" in mb:
        t = mb["teacher"]
      else:
        t = jax.lax.stop_gradient(
            _encode_teacher(teacher, t_norm, tp, mb["rgb"]))
      x = s_norm(student_inputs(mb["other"], mb["rgb"], mode))
      s, model_state = student_spec.train_apply(
          model, params, model_state, x,
          key=key if grad_accum == 1 else jax.random.fold_in(key, index))
      return losses.dual_modality_kd_loss(
          student_embeddings=s.astype(jnp.float32), teacher_embeddings=t,
          kind=kind), model_state

    (loss, model_state), grads = optim_lib.accumulated_value_and_grad(
        loss_fn, state.params, batch, state.model_state, grad_accum)
    gnorm = optax.global_norm(grads)
    return (state.apply_gradients(grads, model_state=model_state),
            {"loss": loss, "grad_norm": gnorm})

  return train_step


def _batches(config: Any, ctx: runner.Context, train_src: Any, indices: Any,
             encode_teacher: Any, t_params: Any):
  """Paired batches, or cached-teacher batches when teacher_cache is on."""
  crop = tuple(config.crop_scale)
  local_batch = mesh_lib.per_process_batch(config.batch_size)
  num_views = int(config.teacher_cache.num_views)
  if not num_views:
    return iter(data_lib.paired_loader(
        train_src, batch_size=local_batch, image_size=config.image_size,
        train=True, seed=config.seed, indices=indices, crop_scale=crop))
  if jax.process_count() > 1:
    raise ValueError(
        "config.teacher_cache.num_views > 0 is single-process only (every "
        "process would store the whole cache); set it to 0 for multi-host "
        "runs.")
  batch_sh = mesh_lib.batch_sharding(ctx.mesh)
  encode = jax.jit(encode_teacher,
                   in_shardings=(mesh_lib.tree_shardings(t_params), batch_sh))
  views = teacher_cache.build(
      functools.partial(encode, t_params), train_src, workdir=ctx.workdir,
      num_views=num_views, seed=config.seed, batch_size=local_batch,
      image_size=config.image_size, indices=indices, crop_scale=crop,
      mesh=ctx.mesh)
  return teacher_cache.CachedBatches(views, lambda v: teacher_cache.view_loader(
      train_src, view=v, seed=config.seed, batch_size=local_batch,
      image_size=config.image_size, indices=indices, crop_scale=crop))


def _memory_options(config: Any, meta: dict[str, Any], teacher: Any,
                    t_params: Any) -> tuple[Any, Any, Any]:
  """(student to train, teacher, teacher params) under compute_dtype,
  teacher_param_dtype and remat. The saved student (meta) is unchanged:
  these are how the step runs, not what it trains."""
  dtype = DTYPES[config.compute_dtype]
  extra = {}
  if dtype != jnp.float32:
    extra["dtype"] = dtype
    teacher = teacher.clone(dtype=dtype)
  if config.remat:
    extra["remat"] = True
  train_model = handoff.build_student(
      {**meta, "overrides": {**meta["overrides"], **extra}})
  p_dtype = DTYPES[config.teacher_param_dtype]
  if p_dtype != jnp.float32:
    t_params = jax.tree.map(lambda x: x.astype(p_dtype), t_params)
  return train_model, teacher, t_params


def build(config: Any, ctx: runner.Context) -> runner.TrainSpec:
  """Stage 1: distils the teacher into the student on both modalities."""
  mesh = ctx.mesh
  train_src = splits.load_source(config, "train")
  val_src = splits.load_source(config, "validation")
  info = train_src.info
  teacher, t_params, tokenizer = handoff.load_teacher(config.teacher,
                                                      mesh=mesh)
  text = handoff.text_features(teacher, t_params, tokenizer,
                               info.class_names, info.prompt_templates[:1])
  meta = student_spec.student_meta(config, teacher.config.projection_dim)
  model = handoff.build_student(meta)
  train_model, teacher, t_params = _memory_options(config, meta, teacher,
                                                   t_params)
  t_norm = handoff.normalizer(config.teacher_normalization)
  s_norm = handoff.normalizer(config.student.normalization)
  indices, _ = curation.curated_subset(config.pseudo_labels,
                                      config.kept_fraction)
  schedule = curation.stage_schedule(
      config, len(train_src) if indices is None else len(indices))
  encode_teacher = functools.partial(_encode_teacher, teacher, t_norm)
  batches = _batches(config, ctx, train_src, indices, encode_teacher,
                     t_params)
  keys = ("rgb", "other") + (("teacher",) if config.teacher_cache.num_views
                             else ())
  best = validation.keep_best_student(ctx.workdir, meta)
  other = info.other_modality

  def report(state, summary):
    del state
    return {"student_path": ".",
            "kd": {**validation.best_report(best, other),
                   "loss": summary.get("loss"),
                   "kept_examples": None if indices is None else len(indices),
                   **schedule}}

  return runner.TrainSpec(
      init=student_spec.student_init_fn(
          config, model, meta,
          jax.random.fold_in(jax.random.key(config.seed), 1)),
      step=make_train_step(train_model, teacher, kind=config.kd_loss,
                           mode=config.student_inputs, t_norm=t_norm,
                           s_norm=s_norm, grad_accum=config.grad_accum),
      aux=(t_params,), aux_shardings=(mesh_lib.tree_shardings(t_params),),
      batches=batches, num_steps=schedule["num_steps"],
      steps_per_epoch=schedule["steps_per_epoch"],
      prepare=lambda b: mesh_lib.shard_batch({k: b[k] for k in keys}, mesh),
      rules=(mesh_lib.REPLICATED_RULES
             if config.student_sharding == "replicated"
             else layers.LOGICAL_AXIS_RULES),
      evaluators=[validation.ZeroShotValidation(
          model.apply, val_src, text, image_size=config.image_size,
          batch_size=config.eval_batch_size,
          normalization=config.student.normalization)],
      keep_best=best, report=report, title="Dual-modality KD")
