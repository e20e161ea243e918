"""EdgeVL pipeline configs: one builder per stage, the paper's settings.

Each stage builder returns (stage name, job, that job's keys); `pipeline`
turns a list of them into a pipeline config whose shared keys (dataset,
data_dir, data_config, image_size) and run keys (seed, cadence, ...) are
FieldReferences of the top level, so `--config.seed=3` changes the seed of
every stage at once and `--config.stages.NAME.seed=4` one stage.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from edgevl_jax.run import config as config_lib
from edgevl_jax.run import registry

# Paper optimiser settings (specs/EDGEVL.md, hyper-parameter table).
STAGE1_OPTIM = dict(name="adamw", lr=1e-4, end_lr=5e-6, schedule="cosine",
                    weight_decay=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                    grad_clip_norm=5.0)
STAGE2_OPTIM = dict(STAGE1_OPTIM, lr=1e-6, end_lr=5e-7)
Stage = tuple[str, str, dict[str, Any]]


def clip_pretrain(*, model, batch_size, num_steps, optim,
                  crop_scale=(0.5, 1.0), prompt_fraction=0.5, loss="unicl",
                  **run_keys) -> Stage:
  """The CLIP teacher stage; loss 'unicl' treats same-class texts of a batch
  as positives (needed once class prompts repeat), 'clip' is plain InfoNCE."""
  return ("clip_pretrain", "clip_pretrain", dict(
      model=model, batch_size=batch_size, num_steps=num_steps, optim=optim,
      crop_scale=crop_scale, prompt_fraction=prompt_fraction, loss=loss,
      **run_keys))


def pseudo_labels(*, teacher, kept_fraction,
                  teacher_normalization="clip") -> Stage:
  return ("pseudo_labels", "pseudo_labels", dict(
      teacher=teacher, kept_fraction=kept_fraction,
      teacher_normalization=teacher_normalization))


def dual_modality_kd(*, teacher, pseudo, student, batch_size, num_steps,
                     optim, crop_scale=(0.08, 1.0),
                     teacher_normalization="clip", kd_loss="l1",
                     student_inputs="both", cache_views=0,
                     **run_keys) -> Stage:
  """Stage 1; `student` is {name, normalization, overrides[, hf_path]}."""
  return ("dual_modality_kd", "dual_modality_kd", dict(
      teacher=teacher, pseudo_labels=pseudo, student=student,
      batch_size=batch_size, num_steps=num_steps, optim=optim,
      crop_scale=crop_scale, teacher_normalization=teacher_normalization,
      kd_loss=kd_loss, student_inputs=student_inputs,
      teacher_cache=dict(num_views=cache_views), **run_keys))


def qat_contrastive(*, init_from, teacher, pseudo, batch_size, num_steps,
                    optim, crop_scale=(0.08, 1.0), mining="offline",
                    mining_space="normalized", margin=0.3, max_negatives=3,
                    **run_keys) -> Stage:
  return ("qat_contrastive", "qat_contrastive", dict(
      init_from=init_from, teacher=teacher, pseudo_labels=pseudo,
      batch_size=batch_size, num_steps=num_steps, optim=optim,
      crop_scale=crop_scale, mining=mining, mining_space=mining_space,
      margin=margin, max_negatives=max_negatives, quant="int8", **run_keys))


def evaluate(*, teacher, student, student_fp32, pseudo,
             crop_scale=(0.08, 1.0), teacher_normalization="clip") -> Stage:
  return ("evaluate", "zero_shot_eval", dict(
      teacher=teacher, student=student, student_fp32=student_fp32,
      pseudo_labels=pseudo, crop_scale=crop_scale,
      teacher_normalization=teacher_normalization))


def export(*, teacher, student, pseudo, crop_scale=(0.08, 1.0)) -> Stage:
  return ("export", "export", dict(teacher=teacher, student=student,
                                   pseudo_labels=pseudo,
                                   crop_scale=crop_scale))


def edgevl_stages(*, teacher, kd, qat, kept_fraction,
                  teacher_normalization="clip",
                  crop_scale=(0.08, 1.0)) -> list[Stage]:
  """pseudo_labels -> dual_modality_kd -> qat_contrastive -> evaluate -> export.

  Args:
    teacher: HF CLIP folder or a reference such as
      '@clip_pretrain/teacher_path'.
    kd: keyword arguments of `dual_modality_kd` (student, batch_size, ...).
    qat: keyword arguments of `qat_contrastive`.
    kept_fraction: curation fraction.
  """
  pseudo = "@pseudo_labels/workdir"
  return [
      pseudo_labels(teacher=teacher, kept_fraction=kept_fraction,
                    teacher_normalization=teacher_normalization),
      dual_modality_kd(teacher=teacher, pseudo=pseudo,
                       teacher_normalization=teacher_normalization,
                       crop_scale=crop_scale, **kd),
      qat_contrastive(init_from="@dual_modality_kd/workdir", teacher=teacher,
                      pseudo=pseudo, crop_scale=crop_scale, **qat),
      evaluate(teacher=teacher, student="@qat_contrastive/workdir",
               student_fp32="@dual_modality_kd/workdir", pseudo=pseudo,
               crop_scale=crop_scale,
               teacher_normalization=teacher_normalization),
      export(teacher=teacher, student="@qat_contrastive/workdir",
             pseudo=pseudo, crop_scale=crop_scale),
  ]


def pipeline(stages: list[Stage], *, dataset: str, data_dir: str,
             data_config: str, image_size: int, seed: int
             ) -> ml_collections.ConfigDict:
  """The pipeline config; the keyword values are shared by every stage."""
  config = registry.pipeline_config(
      stages, dataset=dataset, data_dir=data_dir, data_config=data_config,
      image_size=image_size)
  config.seed = seed
  return config


# Students selectable by config arg, with EdgeVL's settings.
STUDENTS = ("swin_t", "swin_t_edgevl", "vit_ti16", "vit_s16", "vit_b16",
            "resnet18", "mobilenet_v2")


def _tiny_overrides(name):
  if name.startswith("vit"):
    return dict(patch_size=4, width=32, depth=1, num_heads=2)
  if name.startswith("swin"):
    return dict(patch_size=2, window_size=2, width=16, depths=(1, 1, 1, 1),
                num_heads=(1, 1, 1, 1))
  return {}


def paper_config(arg, *, dataset, kept_fraction, data_config="",
                 default_student="swin_t_edgevl", mining="offline"):
  """EdgeVL on a real dataset with the paper's hyper-parameters.

  Args (config arg string): student=NAME, teacher=PATH (an HF CLIP folder,
  required for real runs), student_hf=PATH (a Hugging Face ImageNet folder of
  the student's architecture to start stage 1 from; '' = from scratch; with
  runlocal the tiny overrides are skipped, the folder sets the model),
  data_dir=PATH, source_dir=PATH (local copy of the dataset for the
  builders), seed=N, mining=offline|online,
  mining_space=normalized|unnormalized, teacher_normalization=clip|imagenet,
  epochs=N (120), steps_per_epoch=N (curated train size / batch size),
  runlocal (tiny sizes and steps for a laptop smoke run).
  """
  args = config_lib.parse_arg(
      arg, student=default_student, teacher="", student_hf="",
      data_dir="workdirs/tfds", source_dir=data_config, seed=0, mining=mining,
      mining_space="normalized", teacher_normalization="clip",
      runlocal=False, epochs=120, steps_per_epoch=100)
  if args.student not in STUDENTS:
    raise ValueError(f"config arg student={args.student!r}; choose one of "
                     f"{list(STUDENTS)}.")
  local = args.runlocal
  image_size = 32 if local else 224
  overrides = dict(image_size=image_size)
  if local and not args.student_hf:
    overrides.update(_tiny_overrides(args.student))
  student = dict(name=args.student, normalization="imagenet",
                 overrides=overrides, hf_path=args.student_hf)
  epochs = 1 if local else args.epochs
  # The paper counts epochs; schedules need steps up front, so the arg
  # steps_per_epoch should be (kept_fraction x train size) / batch size.
  stage1_steps = 20 if local else epochs * args.steps_per_epoch
  stage2_steps = 10 if local else epochs * args.steps_per_epoch
  teacher = args.teacher or "/path/to/hf_clip_vit_g14"
  stages = edgevl_stages(
      teacher=teacher, kept_fraction=kept_fraction,
      teacher_normalization=args.teacher_normalization,
      kd=dict(student=student, batch_size=8 if local else 32,
              num_steps=stage1_steps, eval_every=stage1_steps,
              optim=dict(STAGE1_OPTIM)),
      qat=dict(batch_size=2 if local else 4, num_steps=stage2_steps,
               eval_every=stage2_steps, mining=args.mining,
               mining_space=args.mining_space, optim=dict(STAGE2_OPTIM)))
  return pipeline(stages, dataset=dataset, data_dir=args.data_dir,
                  data_config=args.source_dir, image_size=image_size,
                  seed=args.seed)
