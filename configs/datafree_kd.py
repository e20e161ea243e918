"""Data-free adversarial distillation (CDFKD-MFS, Hao et al. 2022).

  python -m edgevl_jax.main --config=configs/datafree_kd.py --workdir=DIR
  python -m edgevl_jax.main --config=configs/datafree_kd.py:cifar100 \
      --workdir=DIR --config.teachers_dir=TEACHERS_WORKDIR

No arg: the CPU-scale pipeline on sklearn_digits (a small real dataset that
ships with scikit-learn): train three small teachers -> data-free
distillation into a 3-head student (which ends by evaluating teachers and
student on the real test split and fitting the attention aggregation on 2 %
of the training images). Teachers: widths 8-64, 4 epochs (~98 % test
accuracy); distillation: batch 64, 160 iterations, generator ngf 32. About
12 minutes on an idle 2-core CPU (the student reaches ~93 % against a ~99 %
teacher ensemble).

Paper settings (student ResNet-18 multi-head, 3 teachers, nz = 256):
  cifar100:      32 px, batch 256, 300 epochs x 50 iterations, milestones
                 100/200, w_ens 5;
  caltech101:    128 px, batch 64, same schedule, w_ens 5;
  mini_imagenet: 224 px, batch 64, 100 epochs x 750 iterations, milestones
                 30/60/90, w_ens 1.
These need teachers trained on the real data (`teachers_dir`, a
'classifier' workdir) and the dataset prepared under `data_dir` for the
final evaluation. `quick` shrinks the default pipeline for tests.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import classifier as classifier_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from edgevl_jax.train import config_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

# Small ResNet-18-style trunk (CIFAR stem), shared by the CPU teachers and
# the student trunk, so pooled feature sizes match (feature loss active).
CPU_TRUNK = dict(classifier_config.CPU_TEACHER)

_PAPER = {
    "cifar100": dict(dataset="cifar100", image_size=32, batch_size=256,
                     epochs=300, iters_per_epoch=50, milestones=(100, 200),
                     w_ens=5.0),
    "caltech101": dict(dataset="caltech101", image_size=128, batch_size=64,
                       epochs=300, iters_per_epoch=50, milestones=(100, 200),
                       w_ens=5.0),
    "mini_imagenet": dict(dataset="mini_imagenet", image_size=224,
                          batch_size=64, epochs=100, iters_per_epoch=750,
                          milestones=(30, 60, 90), w_ens=1.0),
}


def _datafree(p: dict, data_dir: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = "datafree_kd"
  c.dataset = p["dataset"]
  c.data_dir = data_dir
  c.teachers_dir = ""
  c.seed = 0
  c.batch_size = p["batch_size"]
  c.epochs = p["epochs"]
  c.iters_per_epoch = p["iters_per_epoch"]
  c.student_steps = 5
  c.student = ml_collections.ConfigDict(dict(trunk="resnet18", overrides={}))
  c.generator = ml_collections.ConfigDict(dict(image_size=p["image_size"],
                                               overrides={}))
  c.student_optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="step",
      milestones=tuple(p["milestones"])))
  c.generator_optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, schedule="step", milestones=tuple(p["milestones"])))
  c.loss = ml_collections.ConfigDict(dict(
      w_feat=0.2, w_ens=p["w_ens"], w_bn=0.1, bn_first_weight=5.0))
  c.attention = ml_collections.ConfigDict(dict(
      enabled=True, fraction=0.01, steps=200, lr=1e-2))
  c.log_every = 50
  c.ckpt_every = 500
  c.eval_every = ml_collections.config_dict.placeholder(int)
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_utils.parse_arg(
      arg, cifar100=False, caltech101=False, mini_imagenet=False, quick=False,
      data_dir="/tmp/tfds")
  chosen = [k for k in _PAPER if args[k]]
  if len(chosen) > 1:
    raise ValueError(f"configs/datafree_kd.py: choose one of {list(_PAPER)}, "
                     f"found {chosen}.")
  if chosen:
    return _datafree(_PAPER[chosen[0]], args.data_dir)

  teachers = classifier_config.get_config(f"data_dir={args.data_dir}")
  teachers.name = "teachers"
  teachers.model.overrides = dict(CPU_TRUNK)
  teachers.num_epochs = 4
  distill = _datafree(dict(
      dataset="sklearn_digits", image_size=32, batch_size=64, epochs=8,
      iters_per_epoch=20, milestones=(6,), w_ens=5.0), args.data_dir)
  distill.name = "datafree_kd"
  distill.teachers_dir = "@teachers/workdir"
  distill.student.overrides = dict(CPU_TRUNK)
  distill.generator.overrides = dict(ngf=32)
  distill.attention.fraction = 0.02
  distill.log_every = 25
  distill.ckpt_every = 100
  distill.eval_every = 50
  if args.quick:
    teachers.num_models, teachers.num_epochs = 2, 1
    distill.epochs, distill.iters_per_epoch = 2, 2
    distill.student_optim.milestones = distill.generator_optim.milestones = (1,)
    distill.batch_size = 16
    distill.log_every, distill.eval_every, distill.ckpt_every = 2, None, 2
  c = ml_collections.ConfigDict()
  c.trainer = "pipeline"
  c.stages = [teachers, distill]
  return c
