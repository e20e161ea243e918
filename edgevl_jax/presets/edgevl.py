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


def _steps(num_steps):
  """{} when a stage counts epochs instead (its schema default stays)."""
  return {} if num_steps is None else {"num_steps": num_steps}


def dual_modality_kd(*, teacher, pseudo, student, batch_size, optim,
                     num_steps=None, crop_scale=(0.08, 1.0),
                     teacher_normalization="clip", kd_loss="l1",
                     student_inputs="both", cache_views=0,
                     **run_keys) -> Stage:
  """Stage 1; `student` is {name, normalization, overrides[, hf_path]}."""
  return ("dual_modality_kd", "dual_modality_kd", dict(
      teacher=teacher, pseudo_labels=pseudo, student=student,
      batch_size=batch_size, **_steps(num_steps), optim=optim,
      crop_scale=crop_scale, teacher_normalization=teacher_normalization,
      kd_loss=kd_loss, student_inputs=student_inputs,
      teacher_cache=dict(num_views=cache_views), **run_keys))


def qat_contrastive(*, init_from, teacher, pseudo, batch_size, optim,
                    num_steps=None, crop_scale=(0.08, 1.0), mining="offline",
                    mining_space="normalized", margin=0.3, max_negatives=3,
                    **run_keys) -> Stage:
  return ("qat_contrastive", "qat_contrastive", dict(
      init_from=init_from, teacher=teacher, pseudo_labels=pseudo,
      batch_size=batch_size, **_steps(num_steps), optim=optim,
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
            "resnet18", "mobilenet_v2", "ghostnetv3_100")


def _tiny_overrides(name):
  if name.startswith("vit"):
    return dict(patch_size=4, width=32, depth=1, num_heads=2)
  if name.startswith("swin"):
    return dict(patch_size=2, window_size=2, width=16, depths=(1, 1, 1, 1),
                num_heads=(1, 1, 1, 1))
  if name.startswith("ghostnet"):
    # Three stages of GhostNetV3 bottlenecks (the DFC attention in the
    # last), quarter width.
    return dict(width=0.25, head_features=32, cfgs=(
        ((3, 16, 16, 0.0, 1),), ((3, 48, 24, 0.0, 2),),
        ((5, 72, 40, 0.25, 2), (5, 120, 40, 0.25, 1))))
  if name.startswith("resnet"):
    return dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64),
                stem_width=8, cifar_stem=True)
  return {}


# Curated fractions (stage 1, stage 2) of the EdgeVL reference configs;
# datasets/students they do not list take the nearest listed setting.
_VIT_KEPT = (0.25, 0.25)
_KEPT = {"scannet": (0.20, 0.25), "nyuv2": (0.20, 0.25),
         "eurosat": (0.10, 0.50),
         # SUN RGB-D: no curation in stage 1.
         "sun_rgbd": (1.0, 0.98)}
_MARGIN = {"sun_rgbd": 0.15}
PAPER_DATASETS = tuple(_KEPT)
STUDENT_HF_HELP = (
    "The paper starts students from ImageNet weights: pass "
    "student_hf=PATH, a Hugging Face folder of the student's architecture "
    "(config.json + model.safetensors, e.g. what "
    "`transformers.AutoModel.from_pretrained('microsoft/swin-tiny-patch4-"
    "window7-224').save_pretrained(PATH)` writes on a machine with internet; "
    "google/vit-base-patch16-224 for ViT-B/16, microsoft/resnet-18 for "
    "ResNet-18), or student_hf=none to train from scratch.")


def reference_curation(dataset: str, student: str
                       ) -> tuple[tuple[float, float], float]:
  """((stage-1, stage-2) kept fractions, triplet margin) of the reference.

  ScanNet Swin 0.20 / 0.25, EuroSAT Swin 0.10 / 0.50, ViT students 0.25 /
  0.25, SUN RGB-D 1.0 (no curation) / 0.98 with margin 0.15 (0.3
  elsewhere). CNN students and NYUv2 take the Swin / ScanNet settings.
  """
  if dataset not in _KEPT:
    raise ValueError(f"dataset {dataset!r}; choose one of "
                     f"{sorted(_KEPT)}.")
  kept = _KEPT[dataset]
  if student.startswith("vit") and dataset != "sun_rgbd":
    kept = _VIT_KEPT
  return kept, _MARGIN.get(dataset, 0.3)


def paper_config(arg, *, dataset, data_config="",
                 default_student="swin_t_edgevl", mining="offline"):
  """EdgeVL on a real dataset with the paper's protocol.

  Each stage runs `epochs` (120) epochs over its own curated subset at its
  own batch (stage 1: 32 pairs, stage 2: 4 anchors); the steps are computed
  by the stage from its subset size and recorded in report.json
  (kd/qat.num_steps, steps_per_epoch, epochs). Curated fractions and the
  margin per dataset and student: `reference_curation`. The pseudo-label
  vocabulary is the published superset list (the pseudo_labels key
  vocabulary=dataset_classes uses the evaluation classes instead). Static
  int8 ranges are calibrated on the float forward pass; Swin's patch
  embedding stays float (student override quantize_patch_embed=True
  quantises it), ViT's is quantised.

  Args (config arg string): student=NAME, teacher=PATH (an HF CLIP folder,
  required for real runs), student_hf=PATH|none (required: a Hugging Face
  ImageNet folder of the student's architecture to start stage 1 from, or
  'none' for from scratch; with runlocal it defaults to none and a folder
  replaces the tiny overrides), data_dir=PATH, source_dir=PATH (local copy
  of the dataset for the builders), seed=N, mining=offline|online,
  mining_space=normalized|unnormalized, teacher_normalization=clip|imagenet,
  epochs=N (120, both stages), runlocal (tiny sizes, one epoch per stage,
  for a laptop smoke run).
  """
  args = config_lib.parse_arg(
      arg, student=default_student, teacher="", student_hf="",
      data_dir="workdirs/tfds", source_dir=data_config, seed=0, mining=mining,
      mining_space="normalized", teacher_normalization="clip",
      runlocal=False, epochs=120)
  if args.student not in STUDENTS:
    raise ValueError(f"config arg student={args.student!r}; choose one of "
                     f"{list(STUDENTS)}.")
  local = args.runlocal
  if not args.student_hf and not local:
    raise ValueError(f"config arg student_hf is not set. {STUDENT_HF_HELP}")
  student_hf = "" if args.student_hf.lower() == "none" else args.student_hf
  # GhostNetV3's DFC attention pools the stride-32 map 2x: 64 px at least.
  image_size = (64 if args.student.startswith("ghostnet") else 32) if (
      local) else 224
  overrides = dict(image_size=image_size)
  if local and not student_hf:
    overrides.update(_tiny_overrides(args.student))
  student = dict(name=args.student, normalization="imagenet",
                 overrides=overrides, hf_path=student_hf)
  epochs = 1 if local else args.epochs
  (kept1, kept2), margin = reference_curation(dataset, args.student)
  teacher = args.teacher or "/path/to/hf_clip_vit_g14"
  stages = edgevl_stages(
      teacher=teacher, kept_fraction=kept1,
      teacher_normalization=args.teacher_normalization,
      kd=dict(student=student, batch_size=8 if local else 32,
              epochs=float(epochs), kept_fraction=kept1,
              optim=dict(STAGE1_OPTIM)),
      qat=dict(batch_size=2 if local else 4, epochs=float(epochs),
               kept_fraction=kept2, margin=margin, mining=args.mining,
               mining_space=args.mining_space, optim=dict(STAGE2_OPTIM)))
  return pipeline(stages, dataset=dataset, data_dir=args.data_dir,
                  data_config=args.source_dir, image_size=image_size,
                  seed=args.seed)
