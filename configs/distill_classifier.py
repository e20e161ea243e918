r"""Supervised KD with OFA-KD branches: classifier teacher -> student.

  python -m edgevl_jax.main --config=configs/distill_classifier.py \
      --workdir=DIR
  python -m edgevl_jax.main --config=configs/distill_classifier.py:quick ...
  python -m edgevl_jax.main \
      --config=configs/distill_classifier.py:teacher=CLASSIFIER_DIR ...

No `teacher`: a pipeline that first trains one width-reduced ResNet-18
teacher on sklearn_digits ('classifier' trainer), then distils it into a
smaller heterogeneous student (a tiny ViT, 4x4 patches) with CE + KD + OFA
branches on stages 1-3, and (compare) the same student without branches.
With `teacher=DIR` only the distillation stage runs.

Args: quick (tiny run for tests), teacher=PATH, student=vit|resnet,
kd=kl|ofa, compare (also train without branches; default on),
data_dir=PATH.
"""
from edgevl_jax.presets import classification as presets
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import registry

VIT_STUDENT = dict(name="vit_ti16", overrides=dict(
    image_size=32, patch_size=4, width=48, depth=4, num_heads=3,
    drop_path_rate=0.0))
RESNET_STUDENT = dict(name="resnet18", overrides=dict(
    stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=8,
    cifar_stem=True, image_size=32))


def _distill(args) -> dict:
  values = dict(
      dataset="sklearn_digits", data_dir=args.data_dir,
      teacher=args.teacher or "@teacher/workdir",
      student=VIT_STUDENT if args.student == "vit" else RESNET_STUDENT,
      batch_size=64, num_epochs=10,
      optim=dict(name="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine",
                 warmup_steps=20),
      augment=dict(crop_padding=2, flip=False), ce_weight=1.0, kd_weight=1.0,
      kd=args.kd, kd_temperature=4.0,
      ofa=dict(stages=(1, 2, 3), weight=1.0, gamma=1.5, temperature=1.0),
      compare_without_ofa=args.compare, log_every=20)
  if args.quick:
    values.update(batch_size=32, num_epochs=1, log_every=5)
    values["optim"]["warmup_steps"] = 2
  return values


def get_config(arg=None):
  args = config_lib.parse_arg(arg, quick=False, teacher="", student="vit",
                              kd="ofa", compare=True, data_dir="/tmp/tfds")
  if args.student not in ("vit", "resnet"):
    raise ValueError(f"student must be 'vit' or 'resnet', found "
                     f"{args.student!r}.")
  if args.teacher:
    return registry.job_config("distill_classifier", **_distill(args))
  teacher = presets.classifier(data_dir=args.data_dir)
  teacher["num_models"] = 1
  if args.quick:
    teacher["num_epochs"] = 1
  return registry.pipeline_config([
      ("teacher", "classifier", teacher),
      ("distill_classifier", "distill_classifier", _distill(args))])
