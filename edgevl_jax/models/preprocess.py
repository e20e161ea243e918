"""Image normalisation for the CLIP teacher and ImageNet-pretrained students.

EdgeVL's public code feeds the teacher ImageNet-normalised pixels; CLIP was
trained with its own statistics, which is the default here. Both are kept
selectable (see specs/EDGEVL.md, "Teacher").
"""
from __future__ import annotations

from typing import Any

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_STATS = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


def normalize(images: Any, kind: str = "clip") -> Any:
  """Per-channel `(x - mean) / std` of float images in [0, 1].

  Args:
    images: (..., H, W, 3) float array in [0, 1], NHWC; numpy or jax.
    kind: 'clip' (CLIP's statistics) or 'imagenet'.

  Returns:
    An array of the same kind (numpy in, numpy out; jax in, jax out) and
    shape; numpy output is float32.
  """
  if kind not in _STATS:
    raise ValueError(
        f"normalize: unknown kind {kind!r}; expected one of {sorted(_STATS)}."
    )
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) < 3 or shape[-1] != 3:
    raise ValueError(
        f"normalize: expected NHWC images with 3 channels (..., H, W, 3), "
        f"found shape {shape}; convert single-channel modalities (depth) to "
        "3 channels first."
    )
  mean, std = _STATS[kind]
  if isinstance(images, np.ndarray):
    mean_a = np.asarray(mean, np.float32)
    std_a = np.asarray(std, np.float32)
    return ((images.astype(np.float32) - mean_a) / std_a).astype(np.float32)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else (
      jnp.float32)
  images = images.astype(dtype)
  return (images - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)
