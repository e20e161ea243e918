"""Named stage features of the CLIP teacher and of any student, for CKA.

    fn = features.feature_fn(teacher, {'params': t_params}, kind='teacher',
                             normalization='clip')
    feats = fn(images01)   # {'block1': (B, p), 'block3': ..., ...}

Teacher stages are vision-encoder blocks (default: the OFA-KD convention,
blocks 1, 3, 9, 11 (0-based) of 12, scaled to the depth via
`vit.stage_blocks`); student stages are the four outputs of
`method='features'` ('stage1'..'stage4'). Each stage is flattened per example
(tokens * dim including CLS, or H * W * C); `pooled=True` instead averages
over tokens / positions (B, C), which is cheaper and ignores spatial layout.
Images are float [0, 1] NHWC of any modality already made 3-channel by the
data pipeline (depth is repeated); normalisation is applied here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from edgevl_jax.models import preprocess
from edgevl_jax.models.vit import stage_blocks

KINDS = ("teacher", "student")


def flatten_stage(feature: jax.Array, *, pooled: bool = False) -> jax.Array:
  """(B, T, C) tokens or (B, H, W, C) maps -> (B, p) float32.

  pooled=False keeps everything (T * C or H * W * C); pooled=True averages
  over tokens / positions -> (B, C).
  """
  if feature.ndim < 2:
    raise ValueError(f"stage features need a batch axis and a feature axis, "
                     f"got shape {feature.shape}.")
  feature = feature.astype(jnp.float32)
  if pooled and feature.ndim > 2:
    return jnp.mean(feature, axis=tuple(range(1, feature.ndim - 1)))
  return feature.reshape(feature.shape[0], -1)


def teacher_block_names(num_blocks: int,
                        blocks: Sequence[int] | None = None) -> list[str]:
  """'block{i}' names of the chosen (0-based) encoder blocks."""
  chosen = stage_blocks(num_blocks) if blocks is None else tuple(blocks)
  bad = [b for b in chosen if not 0 <= b < num_blocks]
  if bad:
    raise ValueError(f"teacher blocks {bad} out of range 0..{num_blocks - 1}"
                     f" of the {num_blocks}-block vision encoder.")
  # Shallow encoders map several reference blocks to one; keep each once.
  return list(dict.fromkeys(f"block{b}" for b in chosen))


def teacher_stages(model: Any, variables: Mapping[str, Any],
                   images: jax.Array, *, blocks: Sequence[int] | None = None,
                   pooled: bool = False) -> dict[str, jax.Array]:
  """CLIP vision blocks: normalised (B, H, W, 3) -> {'block{i}': (B, p)}."""
  out = model.apply(dict(variables), images, method="image_features")
  stages = out["stages"]
  names = teacher_block_names(len(stages), blocks)
  return {n: flatten_stage(stages[int(n[5:])], pooled=pooled) for n in names}


def student_stages(model: Any, variables: Mapping[str, Any],
                   images: jax.Array, *, pooled: bool = False
                   ) -> dict[str, jax.Array]:
  """Student stages: normalised images -> {'stage1'..'stage4': (B, p)}."""
  out = model.apply(dict(variables), images, method="features")
  return {f"stage{j + 1}": flatten_stage(f, pooled=pooled)
          for j, f in enumerate(out["stages"])}


def stage_fn(model: Any, *, kind: str, normalization: str | None = "clip",
             blocks: Sequence[int] | None = None, pooled: bool = False
             ) -> Callable[[Mapping[str, Any], jax.Array],
                           dict[str, jax.Array]]:
  """A jitted (variables, images01 (B, H, W, 3)) -> {stage: (B, p)} function.

  Variables are an argument, not a constant of the compiled function, so a
  training loop calls the same compiled function with new parameters (and a
  large teacher is never folded into the program).

  Args:
    model: the teacher (`clip.CLIP`) or a student.
    kind: 'teacher' or 'student'.
    normalization: 'clip' / 'imagenet' statistics applied to [0, 1] images,
      or None when images are already model inputs.
    blocks: teacher only: 0-based encoder blocks (default OFA-KD's four).
    pooled: average over tokens / positions instead of flattening.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
  if kind == "student" and blocks is not None:
    raise ValueError("blocks selects teacher encoder blocks; students always "
                     "give their four stages (drop blocks for kind='student').")

  def fn(variables: Mapping[str, Any], images: jax.Array
         ) -> dict[str, jax.Array]:
    x = images if normalization is None else preprocess.normalize(
        images, normalization)
    if kind == "teacher":
      return teacher_stages(model, variables, x, blocks=blocks, pooled=pooled)
    return student_stages(model, variables, x, pooled=pooled)

  return jax.jit(fn)


def feature_fn(model: Any, variables: Mapping[str, Any], *, kind: str,
               normalization: str | None = "clip",
               blocks: Sequence[int] | None = None, pooled: bool = False
               ) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """`stage_fn` with fixed variables: images01 -> {stage name: (B, p)}."""
  fn = stage_fn(model, kind=kind, normalization=normalization, blocks=blocks,
                pooled=pooled)
  variables = dict(variables)
  return lambda images: fn(variables, images)


def modality_images(batch: Mapping[str, Any], modality: str,
                    other_modality: str) -> Any:
  """The (B, H, W, 3) [0, 1] images of `modality` from a paired batch.

  `modality` is 'rgb', 'other', or the dataset's non-RGB name (e.g.
  'depth'), which is the batch's 'other' field.
  """
  if modality == "rgb":
    return batch["rgb"]
  if modality in ("other", other_modality):
    return batch["other"]
  raise ValueError(f"modality must be 'rgb' or {other_modality!r} for this "
                   f"dataset, got {modality!r}.")
