"""Checks of config values that need no compute, shared by the jobs.

Each function raises ValueError naming `config.<key>`, the value and the fix.
Values that are still pipeline references ('@stage/key') are skipped: the
pipeline checks them again once the earlier stage has produced them.
"""
from __future__ import annotations

import os
from typing import Any

import jax

from edgevl_jax import data as data_lib
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import zero_shot
from edgevl_jax.models import clip
from edgevl_jax.run import config as config_lib
from edgevl_jax.utils import io

NORMALIZATIONS = ("clip", "imagenet")
MAX_SEED = 2**31 - 1


def _value(config: Any, key: str) -> Any:
  return config_lib.require(config, key)


def dataset(config: Any, key: str = "dataset") -> None:
  """An EdgeVL paired dataset name (synthetic_rgbd, eurosat, scannet, ...)."""
  config_lib.require(config, key, allowed=data_lib.DATASET_NAMES)


def normalization(config: Any, key: str) -> None:
  config_lib.require(config, key, allowed=NORMALIZATIONS)


def seed(config: Any, key: str = "seed") -> None:
  config_lib.require(config, key, types=int,
                       check=lambda v: 0 <= v <= MAX_SEED,
                       expected=f"an int in [0, {MAX_SEED}]")


def common_edgevl(config: Any) -> None:
  """The keys every EdgeVL stage has: dataset, seed, sizes."""
  dataset(config)
  seed(config)
  positive_ints(config, "image_size", "eval_batch_size")


def positive_ints(config: Any, *keys: str) -> None:
  for key in keys:
    config_lib.require_positive(config, key, integer=True)


def batch_fits_devices(config: Any, key: str = "batch_size", *,
                       minimum: int = 1, what: str = "examples") -> None:
  """The global batch splits evenly over the devices, >= `minimum` in all.

  Contrastive losses need `minimum=2`: with one example the only candidate
  is the positive, the loss is zero and nothing is learnt.
  """
  size = config_lib.require_positive(config, key, integer=True)
  if size < minimum:
    raise ValueError(
        f"config.{key}={size}: this loss needs at least {minimum} {what} per "
        f"batch (with fewer it is zero and nothing is learnt); raise it.")
  devices = jax.device_count()
  if size % devices:
    raise ValueError(
        f"config.{key}={size} does not split over the {devices} devices of "
        f"this run (each device gets an equal share); use a multiple of "
        f"{devices}.")


def teacher_folder(config: Any, key: str = "teacher", *,
                   tokenizer: bool = True) -> None:
  """An HF CLIP folder (or a clip_pretrain workdir) that is complete."""
  path = config_lib.require(config, key, types=str)
  if config_lib.is_reference(path):
    return
  try:
    clip.check_clip_folder(handoff.teacher_dir(path), tokenizer=tokenizer)
  except ValueError as e:
    raise ValueError(f"config.{key}: {e}") from e


def student_folder(config: Any, key: str) -> None:
  """The workdir of a finished dual_modality_kd / qat_contrastive stage."""
  path = config_lib.require(config, key, types=str)
  if config_lib.is_reference(path):
    return
  missing = [f for f in (handoff.STUDENT_FILE, handoff.STUDENT_PARAMS)
             if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise ValueError(
        f"config.{key}={path!r} holds no trained student (missing "
        f"{missing}); point it at the workdir of a finished "
        "dual_modality_kd or qat_contrastive run.")


def folder(config: Any, key: str, *, what: str) -> None:
  """An existing folder (skipped when empty or a reference)."""
  path = config_lib.require(config, key, types=str)
  if path and not config_lib.is_reference(path) and not os.path.isdir(path):
    raise ValueError(f"config.{key}={path!r} is not a folder; it must be "
                     f"{what}.")


def student_fits_teacher(config: Any, student_key: str,
                         teacher_key: str = "teacher") -> None:
  """The student's embedding size equals the teacher's projection size.

  Reads student.json and the teacher's config.json only, so a mismatch is
  named before any image is embedded.
  """
  student, teacher = config[student_key], config[teacher_key]
  if config_lib.is_reference(student) or config_lib.is_reference(teacher):
    return
  meta = io.read_json(
      os.path.join(student, handoff.STUDENT_FILE),
      fix="re-run the stage that wrote it")
  projection = clip.load_config(
      handoff.teacher_dir(teacher)).projection_dim
  zero_shot.check_embed_dim(
      int(meta["embed_dim"]), int(projection),
      student=f"the student in config.{student_key}={student!r}",
      teacher=f"config.{teacher_key}={teacher!r} (projection_dim)")
