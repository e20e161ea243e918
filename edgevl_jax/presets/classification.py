"""Classifier, OFA distillation and data-free distillation settings.

Each function returns the keys of one job (for `registry.job_config` or a
pipeline stage). The CPU settings run on sklearn's digits in minutes; the
paper settings follow CDFKD-MFS (Hao et al. 2022) and need real data.
"""
from __future__ import annotations

from typing import Any

# Width-reduced ResNet-18 with the CIFAR stem: runs on a CPU in minutes.
# Shared by the CPU teachers and the data-free student trunk, so pooled
# feature sizes match (the feature loss is active).
CPU_TEACHER = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64),
                   stem_width=8, cifar_stem=True, image_size=32)


def classifier(*, data_dir: str, cifar100: bool = False, epochs: int = 0
               ) -> dict[str, Any]:
  """Three classifiers: CPU digits teachers, or the paper's ResNet-34s."""
  values = dict(data_dir=data_dir, num_models=3, log_every=20,
                augment=dict(crop_padding=2, flip=False),
                optim=dict(name="sgd", lr=0.1, momentum=0.9,
                           weight_decay=5e-4, schedule="cosine"))
  if cifar100:
    batch_size = 128
    steps_per_epoch = 50000 // batch_size
    values.update(
        dataset="cifar100", image_size=32, batch_size=batch_size,
        num_epochs=epochs or 200,
        model=dict(name="resnet34",
                   overrides=dict(cifar_stem=True, image_size=32)),
        augment=dict(crop_padding=4, flip=True))
    values["optim"].update(schedule="step", milestones=tuple(
        m * steps_per_epoch for m in (60, 120, 160)))
  else:
    values.update(dataset="sklearn_digits", image_size=32, batch_size=64,
                  num_epochs=epochs or 8,
                  model=dict(name="resnet18", overrides=dict(CPU_TEACHER)))
  return values


# CDFKD-MFS paper settings (student ResNet-18 multi-head, 3 teachers). The
# student trunk has the CIFAR stem (3x3/1, no max-pool) on 32 px only; on
# 128 / 224 px it has the ImageNet stem (7x7/2 + max-pool), like the
# teachers there. mini-ImageNet weighs the feature loss 0.05 (0.2 elsewhere).
DATAFREE_PAPER = {
    "cifar100": dict(dataset="cifar100", image_size=32, batch_size=256,
                     epochs=300, iters_per_epoch=50, milestones=(100, 200),
                     w_ens=5.0, w_feat=0.2, cifar_stem=True),
    "caltech101": dict(dataset="caltech101", image_size=128, batch_size=64,
                       epochs=300, iters_per_epoch=50, milestones=(100, 200),
                       w_ens=5.0, w_feat=0.2, cifar_stem=False),
    "mini_imagenet": dict(dataset="mini_imagenet", image_size=224,
                          batch_size=64, epochs=100, iters_per_epoch=750,
                          milestones=(30, 60, 90), w_ens=1.0, w_feat=0.05,
                          cifar_stem=False),
}


def datafree(p: dict[str, Any], *, data_dir: str) -> dict[str, Any]:
  """The datafree_kd keys of a DATAFREE_PAPER-style setting `p`."""
  milestones = tuple(p["milestones"])
  return dict(
      dataset=p["dataset"], data_dir=data_dir, teachers_dir="",
      batch_size=p["batch_size"], epochs=p["epochs"],
      iters_per_epoch=p["iters_per_epoch"], student_steps=5,
      student=dict(trunk="resnet18", overrides=dict(
          cifar_stem=p.get("cifar_stem", True),
          image_size=p["image_size"])),
      generator=dict(image_size=p["image_size"], overrides={}),
      student_optim=dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                         schedule="step", milestones=milestones),
      generator_optim=dict(name="adam", lr=1e-3, schedule="step",
                           milestones=milestones),
      loss=dict(w_feat=p.get("w_feat", 0.2), w_ens=p["w_ens"], w_bn=0.1,
                bn_first_weight=5.0),
      attention=dict(enabled=True, fraction=0.01, steps=200, lr=1e-2),
      log_every=50, ckpt_every=500)


# The CPU data-free run on digits (about 12 minutes on 2 cores).
DATAFREE_DIGITS = dict(dataset="sklearn_digits", image_size=32, batch_size=64,
                       epochs=8, iters_per_epoch=20, milestones=(6,),
                       w_ens=5.0)


def datafree_digits(*, data_dir: str, quick: bool = False) -> dict[str, Any]:
  """datafree_kd keys of the CPU run (teachers from the 'teachers' stage)."""
  values = datafree(DATAFREE_DIGITS, data_dir=data_dir)
  values.update(teachers_dir="@teachers/workdir", log_every=25,
                ckpt_every=100, eval_every=50)
  values["student"]["overrides"] = dict(CPU_TEACHER)
  values["generator"]["overrides"] = dict(ngf=32)
  values["attention"]["fraction"] = 0.02
  if quick:
    values.update(epochs=2, iters_per_epoch=2, batch_size=16, log_every=2,
                  eval_every=0, ckpt_every=2)
    values["student_optim"]["milestones"] = (1,)
    values["generator_optim"]["milestones"] = (1,)
  return values
