"""Shared pieces of the EdgeVL configs: one builder per pipeline stage.

Each builder returns a stage ConfigDict (name, trainer and that trainer's
keys). Values every stage shares (dataset, data_dir, seed, ...) are passed in
as `ml_collections.FieldReference`s from the top-level config, so
`--config.seed=3` changes the seed of every stage at once.
"""
import ml_collections

# Paper optimiser settings (specs/EDGEVL.md, hyper-parameter table).
STAGE1_OPTIM = dict(name="adamw", lr=1e-4, end_lr=5e-6, schedule="cosine",
                    weight_decay=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                    grad_clip_norm=5.0)
STAGE2_OPTIM = dict(STAGE1_OPTIM, lr=1e-6, end_lr=5e-7)


def _stage(name, trainer, shared, **keys):
  c = ml_collections.ConfigDict()
  c.name = name
  c.trainer = trainer
  for k, v in shared.items():
    c[k] = v
  for k, v in keys.items():
    c[k] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v
  return c


def shared_refs(*, dataset, data_dir, data_config, image_size, seed):
  """FieldReferences for the top-level config and every stage."""
  return dict(
      dataset=ml_collections.FieldReference(dataset),
      data_dir=ml_collections.FieldReference(data_dir),
      data_config=ml_collections.FieldReference(data_config, field_type=str),
      image_size=ml_collections.FieldReference(image_size),
      seed=ml_collections.FieldReference(seed))


def clip_pretrain(shared, *, model, batch_size, num_steps, optim,
                  crop_scale=(0.5, 1.0), log_every=50, prompt_fraction=0.5,
                  loss="unicl"):
  """The CLIP teacher stage; loss 'unicl' treats same-class texts of a batch
  as positives (needed once class prompts repeat), 'clip' is plain InfoNCE."""
  return _stage("clip_pretrain", "clip_pretrain", shared, model=model,
                batch_size=batch_size, num_steps=num_steps, optim=optim,
                crop_scale=crop_scale, normalization="clip", init_from="",
                prompt_fraction=prompt_fraction, loss=loss,
                eval_batch_size=256, log_every=log_every, ckpt_every=ml_collections.config_dict.placeholder(int))


def pseudo_labels(shared, *, teacher, kept_fraction,
                  teacher_normalization="clip"):
  return _stage("pseudo_labels", "pseudo_labels", shared, teacher=teacher,
                kept_fraction=kept_fraction,
                teacher_normalization=teacher_normalization,
                eval_batch_size=256, prompt_ensemble=False)


def dual_modality_kd(shared, *, teacher, pseudo, student, batch_size,
                     num_steps, optim, eval_every, crop_scale=(0.08, 1.0),
                     teacher_normalization="clip", kd_loss="l1",
                     student_inputs="both", cache_views=0, log_every=50):
  """Stage 1; `student` is {name, normalization, overrides[, hf_path]}, and
  hf_path (a Hugging Face ImageNet folder, '' = from scratch) defaults to ''."""
  student = {"hf_path": "", **student}
  return _stage("dual_modality_kd", "dual_modality_kd", shared,
                teacher=teacher, pseudo_labels=pseudo, student=student,
                batch_size=batch_size, num_steps=num_steps, optim=optim,
                eval_every=eval_every, crop_scale=crop_scale,
                teacher_normalization=teacher_normalization, kd_loss=kd_loss,
                student_inputs=student_inputs,
                teacher_cache=dict(num_views=cache_views),
                student_sharding="replicated", eval_batch_size=256,
                log_every=log_every, ckpt_every=ml_collections.config_dict.placeholder(int))


def qat_contrastive(shared, *, init_from, teacher, pseudo, batch_size,
                    num_steps, optim, eval_every, crop_scale=(0.08, 1.0),
                    mining="offline", mining_space="normalized", margin=0.3,
                    max_negatives=3, log_every=50):
  return _stage("qat_contrastive", "qat_contrastive", shared,
                init_from=init_from, teacher=teacher, pseudo_labels=pseudo,
                batch_size=batch_size, num_steps=num_steps, optim=optim,
                eval_every=eval_every, crop_scale=crop_scale, mining=mining,
                mining_space=mining_space, margin=margin,
                max_negatives=max_negatives, quant="int8",
                eval_batch_size=256, log_every=log_every, ckpt_every=ml_collections.config_dict.placeholder(int))


def evaluate(shared, *, teacher, student, student_fp32, pseudo,
             crop_scale=(0.08, 1.0), teacher_normalization="clip"):
  return _stage("evaluate", "evaluate", shared, teacher=teacher,
                student=student, student_fp32=student_fp32,
                pseudo_labels=pseudo, crop_scale=crop_scale,
                teacher_normalization=teacher_normalization,
                calibration_batch_size=32, calibration_batches=2,
                eval_batch_size=256, prompt_ensemble=False)


def export(shared, *, teacher, student, pseudo, crop_scale=(0.08, 1.0)):
  return _stage("export", "export_stage", shared, teacher=teacher,
                student=student, pseudo_labels=pseudo, crop_scale=crop_scale,
                calibration_batch_size=32, calibration_batches=2,
                prompt_ensemble=False)


def edgevl_stages(shared, *, teacher, kd, qat, kept_fraction,
                  teacher_normalization="clip", crop_scale=(0.08, 1.0)):
  """pseudo_labels -> dual_modality_kd -> qat_contrastive -> evaluate -> export.

  Args:
    shared: `shared_refs(...)`.
    teacher: HF CLIP folder or a reference such as
      '@clip_pretrain/teacher_path'.
    kd: keyword arguments of `dual_modality_kd` (student, batch_size, ...).
    qat: keyword arguments of `qat_contrastive`.
    kept_fraction: curation fraction.
  """
  pseudo = "@pseudo_labels/workdir"
  return [
      pseudo_labels(shared, teacher=teacher, kept_fraction=kept_fraction,
                    teacher_normalization=teacher_normalization),
      dual_modality_kd(shared, teacher=teacher, pseudo=pseudo,
                       teacher_normalization=teacher_normalization,
                       crop_scale=crop_scale, **kd),
      qat_contrastive(shared, init_from="@dual_modality_kd/workdir",
                      teacher=teacher, pseudo=pseudo, crop_scale=crop_scale,
                      **qat),
      evaluate(shared, teacher=teacher, student="@qat_contrastive/workdir",
               student_fp32="@dual_modality_kd/workdir", pseudo=pseudo,
               crop_scale=crop_scale,
               teacher_normalization=teacher_normalization),
      export(shared, teacher=teacher, student="@qat_contrastive/workdir",
             pseudo=pseudo, crop_scale=crop_scale),
  ]


def pipeline(shared, stages):
  """Top-level pipeline config exposing the shared references."""
  c = ml_collections.ConfigDict()
  c.trainer = "pipeline"
  for k, v in shared.items():
    c[k] = v
  c.stages = stages
  c.stop_after = ""  # a stage name: run the stages up to it only
  return c


# Students selectable by config arg, with EdgeVL's settings.
STUDENTS = ("swin_t", "swin_t_edgevl", "vit_ti16", "vit_s16", "vit_b16",
            "resnet18", "mobilenet_v2")


def paper_config(arg, *, dataset, kept_fraction, data_config="",
                 default_student="swin_t_edgevl", mining="offline"):
  """EdgeVL on a real dataset with the paper's hyper-parameters.

  Args (config arg string): student=NAME, teacher=PATH (an HF CLIP folder,
  required for real runs), student_hf=PATH (a Hugging Face ImageNet folder of
  the student's architecture to start stage 1 from; '' = from scratch; with
  runlocal the tiny overrides are skipped, the folder sets the model),
  data_dir=PATH, source_dir=PATH (local copy of
  the dataset for the builders), seed=N, mining=offline|online,
  mining_space=normalized|unnormalized, teacher_normalization=clip|imagenet,
  epochs=N (120), steps_per_epoch=N (curated train size / batch size),
  runlocal (tiny sizes and steps for a laptop smoke run).
  """
  from edgevl_jax.train import config_utils  # pylint: disable=g-import-not-at-top
  args = config_utils.parse_arg(
      arg, student=default_student, teacher="", student_hf="",
      data_dir="workdirs/tfds",
      source_dir=data_config, seed=0, mining=mining,
      mining_space="normalized", teacher_normalization="clip",
      runlocal=False, epochs=120, steps_per_epoch=100)
  if args.student not in STUDENTS:
    raise ValueError(f"config arg student={args.student!r}; choose one of "
                     f"{list(STUDENTS)}.")
  local = args.runlocal
  image_size = 32 if local else 224
  shared = shared_refs(dataset=dataset, data_dir=args.data_dir,
                       data_config=args.source_dir, image_size=image_size,
                       seed=args.seed)
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
      shared, teacher=teacher, kept_fraction=kept_fraction,
      teacher_normalization=args.teacher_normalization,
      kd=dict(student=student, batch_size=8 if local else 32,
              num_steps=stage1_steps, eval_every=stage1_steps,
              optim=dict(STAGE1_OPTIM)),
      qat=dict(batch_size=2 if local else 4, num_steps=stage2_steps,
               eval_every=stage2_steps, mining=args.mining,
               mining_space=args.mining_space, optim=dict(STAGE2_OPTIM)))
  return pipeline(shared, stages)


def _tiny_overrides(name):
  if name.startswith("vit"):
    return dict(patch_size=4, width=32, depth=1, num_heads=2)
  if name.startswith("swin"):
    return dict(patch_size=2, window_size=2, width=16, depths=(1, 1, 1, 1),
                num_heads=(1, 1, 1, 1))
  return {}
