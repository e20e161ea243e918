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
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import classifier as classifier_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from edgevl_jax.train import config_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

VIT_STUDENT = dict(name="vit_ti16", overrides=dict(
    image_size=32, patch_size=4, width=48, depth=4, num_heads=3,
    drop_path_rate=0.0))
RESNET_STUDENT = dict(name="resnet18", overrides=dict(
    stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=8,
    cifar_stem=True, image_size=32))


def _distill(args) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "distill_classifier"
  c.trainer = "distill_classifier"
  c.dataset = "sklearn_digits"
  c.data_dir = args.data_dir
  c.teacher = args.teacher or "@teacher/workdir"
  c.student = ml_collections.ConfigDict(
      VIT_STUDENT if args.student == "vit" else RESNET_STUDENT)
  c.batch_size = 64
  c.num_epochs = 10
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine",
      warmup_steps=20))
  c.augment = ml_collections.ConfigDict(dict(crop_padding=2, flip=False))
  c.ce_weight = 1.0
  c.kd_weight = 1.0
  c.kd = args.kd
  c.kd_temperature = 4.0
  c.ofa = ml_collections.ConfigDict(dict(stages=[1, 2, 3], weight=1.0,
                                         gamma=1.5, temperature=1.0))
  c.compare_without_ofa = args.compare
  c.seed = 0
  c.log_every = 20
  c.ckpt_every = ml_collections.FieldReference(None, field_type=int)
  if args.quick:
    c.batch_size, c.num_epochs, c.log_every = 32, 1, 5
    c.optim.warmup_steps = 2
  return c


def get_config(arg=None):
  args = config_utils.parse_arg(arg, quick=False, teacher="", student="vit",
                                kd="ofa", compare=True, data_dir="/tmp/tfds")
  if args.student not in ("vit", "resnet"):
    raise ValueError(f"student must be 'vit' or 'resnet', found "
                     f"{args.student!r}.")
  distill = _distill(args)
  if args.teacher:
    distill.trainer = "distill_classifier"
    return distill
  teacher = classifier_config.get_config(f"data_dir={args.data_dir}")
  teacher.name = "teacher"
  teacher.num_models = 1
  if args.quick:
    teacher.num_epochs = 1
  c = ml_collections.ConfigDict()
  c.trainer = "pipeline"
  c.stages = [teacher, distill]
  return c
