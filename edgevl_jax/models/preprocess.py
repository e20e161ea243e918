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
  # Only jax callers pay for importing jax; the numpy data pipeline does not.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else (
      jnp.float32)
  images = images.astype(dtype)
  return (images - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)


def min_max_unit(x: Any) -> np.ndarray:
  """Per-image min-max of raw depth-like values to float32 [0, 1].

  Non-finite pixels (NaN / inf: the invalid pixels of real depth sensors,
  common in float TIFF depth) are holes: the min and max are taken over the
  finite pixels only and holes become 0, so one NaN no longer turns the
  whole image into zeros (or NaN). A constant or all-hole image gives zeros.

  Args:
    x: (H, W) numeric array (numpy or anything `np.asarray` takes).

  Returns:
    (H, W) float32 in [0, 1].
  """
  x = np.asarray(x, np.float32)
  finite = np.isfinite(x)
  if not finite.any():
    return np.zeros(x.shape, np.float32)
  valid = x[finite]
  lo, hi = float(valid.min()), float(valid.max())
  if not hi > lo:
    return np.zeros(x.shape, np.float32)
  if finite.all():  # the common case, bit-identical to a plain min-max
    return (x - lo) / (hi - lo)
  with np.errstate(invalid="ignore"):  # inf - lo at the holes, masked out
    return np.where(finite, (x - lo) / (hi - lo), 0.0).astype(np.float32)
