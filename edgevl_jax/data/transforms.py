"""Joint augmentation of co-registered image pairs, as grain transforms.

EdgeVL applies the SAME random resized crop (scale 0.08-1, ratio 3/4-4/3,
bicubic) and the same horizontal flip to both images of a pair, so the RGB
teacher target stays aligned with the non-RGB student input. At test time
both images are resized to the square output size, no crop.

Non-RGB images become [0, 1] single-channel images before resizing:
depth by per-image min-max over its finite pixels (NaN / inf holes become
0), SWIR by value / 4095 clipped to [0, 1]. After
resizing they are repeated to 3 channels. Outputs are float32 in [0, 1];
CLIP / ImageNet normalisation happens on the model side.
"""
import dataclasses
import math
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from edgevl_jax.models import preprocess

Record = dict[str, Any]
SWIR_MAX = 4095.0
MODALITIES = ("rgb", "other")
# Fields copied unchanged from source records to loader outputs; 'caption'
# only on request (strings cannot become device arrays).
PASSTHROUGH = ("pseudo_label", "valid")


def other_to_unit(other: np.ndarray, modality: str, *,
                  where: str = "") -> np.ndarray:
  """Raw non-RGB values (H, W) -> float32 (H, W) in [0, 1].

  Depth: per-image min-max over the finite pixels; NaN / inf pixels (the
  invalid pixels of real sensors) are holes and become 0
  (`preprocess.min_max_unit`). SWIR: value / 4095 clipped to [0, 1], NaN /
  inf pixels 0. (H, W, 1) and (H, W, 3) with three equal channels are
  accepted; three different channels (a colour-mapped depth PNG) are refused,
  because reading one of them as depth would be silently wrong.

  Args:
    other: (H, W), (H, W, 1) or (H, W, 3) raw values.
    modality: 'depth' or 'swir'.
    where: names the record/file in error messages.
  """
  x = single_channel(other, modality, where=where)
  if modality == "depth":
    return preprocess.min_max_unit(x)
  if modality == "swir":
    x = np.asarray(x, np.float32)
    return np.where(np.isfinite(x), np.clip(x / SWIR_MAX, 0.0, 1.0),
                    0.0).astype(np.float32)
  raise ValueError(f"Unknown non-RGB modality {modality!r}; expected "
                   "'depth' or 'swir'.")


def single_channel(other: np.ndarray, modality: str = "depth", *,
                   where: str = "") -> np.ndarray:
  """(H, W) view of a one-channel image stored as (H, W), (H, W, 1) or
  (H, W, 3) with equal channels; ValueError naming `where` otherwise."""
  x = np.asarray(other)
  if x.ndim == 3 and x.shape[-1] in (1, 3):
    if x.shape[-1] == 3 and not (np.array_equal(x[..., 0], x[..., 1],
                                                equal_nan=True)
                                 and np.array_equal(x[..., 0], x[..., 2],
                                                    equal_nan=True)):
      diff = int(np.count_nonzero(np.any(x != x[..., :1], axis=-1)))
      raise ValueError(
          f"{where + ': ' if where else ''}{modality} image has 3 channels "
          f"that differ ({diff} of {x.shape[0] * x.shape[1]} pixels), e.g. a "
          f"colour-mapped visualisation; {modality} must be one channel (or "
          "three equal channels) of raw values. Export the raw "
          f"{modality} (e.g. a 16-bit single-channel PNG) instead.")
    return x[..., 0]
  if x.ndim != 2:
    raise ValueError(
        f"{where + ': ' if where else ''}{modality} image must be (H, W), "
        f"(H, W, 1) or (H, W, 3) with equal channels; got shape {x.shape}.")
  return x


def sample_crop(rng: np.random.Generator, height: int, width: int,
                scale: Sequence[float] = (0.08, 1.0),
                ratio: Sequence[float] = (3 / 4, 4 / 3)):
  """Random resized crop box (left, top, right, bottom) in pixels.

  Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); ten tries,
  then the largest centred box with the clamped ratio (the usual fallback).
  """
  area = height * width
  log_r = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    r = math.exp(rng.uniform(*log_r))
    w = int(round(math.sqrt(target * r)))
    h = int(round(math.sqrt(target / r)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def _resize_rgb(rgb: np.ndarray, box, size: int) -> np.ndarray:
  img = Image.fromarray(np.asarray(rgb, np.uint8))
  out = img.resize((size, size), Image.BICUBIC, box=box)
  return np.asarray(out, np.float32) / 255.0


def _resize_unit(x: np.ndarray, box, size: int) -> np.ndarray:
  img = Image.fromarray(np.ascontiguousarray(x, np.float32), mode="F")
  out = np.asarray(img.resize((size, size), Image.BICUBIC, box=box))
  # Bicubic overshoots at edges; keep the [0, 1] contract.
  return np.clip(out, 0.0, 1.0)


def transform_pair(record: Record, *, image_size: int, modality: str,
                   modalities: Sequence[str] = MODALITIES,
                   rng: np.random.Generator | None = None,
                   crop_scale: Sequence[float] = (0.08, 1.0),
                   passthrough: Sequence[str] = PASSTHROUGH) -> Record:
  """Crops/resizes (and flips) the requested modalities of one record.

  Args:
    record: a standard source record (sources.py).
    image_size: output side S.
    modality: the dataset's non-RGB modality ('depth' | 'swir').
    modalities: which of 'rgb', 'other' to output.
    rng: None for the test-time resize; a Generator for training
      augmentation (one crop box and one flip decision for both images).
    crop_scale: area fraction range of the random crop.
    passthrough: record fields copied unchanged when present.

  Returns:
    {'rgb'/'other': float32 (S, S, 3) in [0, 1], 'label': int32,
     'index': int32, plus the passthrough fields present}.
  """
  unknown = set(modalities) - set(MODALITIES)
  if unknown or not modalities:
    raise ValueError(f"modalities must be a non-empty subset of {MODALITIES};"
                     f" got {tuple(modalities)}.")
  h, w = np.shape(record["rgb"])[:2]
  if rng is None:
    box, flip = (0, 0, w, h), False
  else:
    box = sample_crop(rng, h, w, crop_scale)
    flip = bool(rng.integers(0, 2))
  out = {"label": np.int32(record["label"]),
         "index": np.int32(record["index"])}
  if "rgb" in modalities:
    out["rgb"] = _resize_rgb(record["rgb"], box, image_size)
  if "other" in modalities:
    unit = other_to_unit(record["other"], modality,
                         where=f"record index {record['index']}")
    out["other"] = np.repeat(
        _resize_unit(unit, box, image_size)[..., None], 3, axis=-1)
  if flip:
    for k in MODALITIES:
      if k in out:
        out[k] = np.ascontiguousarray(out[k][:, ::-1])
  for k in passthrough:
    if k in record:
      out[k] = record[k]
  return out


@dataclasses.dataclass(frozen=True)
class PairedRandomCropFlip(grain.transforms.RandomMap):
  """Training augmentation: one crop + flip shared by both images."""
  image_size: int
  modality: str
  modalities: tuple[str, ...] = MODALITIES
  crop_scale: tuple[float, float] = (0.08, 1.0)
  passthrough: tuple[str, ...] = PASSTHROUGH

  def random_map(self, element: Record, rng: np.random.Generator) -> Record:
    return transform_pair(element, image_size=self.image_size,
                          modality=self.modality, modalities=self.modalities,
                          rng=rng, crop_scale=self.crop_scale,
                          passthrough=self.passthrough)


@dataclasses.dataclass(frozen=True)
class TextDraws(grain.transforms.RandomMap):
  """Adds 'text_draw': float32 (2,) uniforms in [0, 1) for the text choice.

  Drawn from the example's own grain rng (after its crop and flip), so
  which text an image is paired with (caption or prompt, which template)
  depends on the seed and the example's position in the stream only: the
  same on any number of processes and on a resumed run.
  """

  def random_map(self, element: Record, rng: np.random.Generator) -> Record:
    return {**element, "text_draw": rng.random(2).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class PairedResize(grain.transforms.Map):
  """Test-time transform: resize both images to image_size, no crop."""
  image_size: int
  modality: str
  modalities: tuple[str, ...] = MODALITIES
  passthrough: tuple[str, ...] = PASSTHROUGH

  def map(self, element: Record) -> Record:
    return transform_pair(element, image_size=self.image_size,
                          modality=self.modality, modalities=self.modalities,
                          passthrough=self.passthrough)


@dataclasses.dataclass(frozen=True)
class TripletRandomCropFlip(grain.transforms.RandomMap):
  """Augments every example of a (anchor, positive, negatives...) group.

  Input: {'records': list of 2 + K records or None (missing negative)}.
  Output: {'rgb'/'other': (2 + K, S, S, 3), 'label', 'index': int32 (2 + K,),
  'mask': bool (2 + K,)}; missing slots are zeros with mask False, label
  and index -1. Each slot gets its own crop, shared by its two modalities.
  """
  image_size: int
  modality: str
  modalities: tuple[str, ...] = MODALITIES
  crop_scale: tuple[float, float] = (0.08, 1.0)

  def random_map(self, element: Record, rng: np.random.Generator) -> Record:
    s = self.image_size
    records = element["records"]
    n = len(records)
    out = {k: np.zeros((n, s, s, 3), np.float32) for k in self.modalities}
    out["label"] = np.full((n,), -1, np.int32)
    out["index"] = np.full((n,), -1, np.int32)
    out["mask"] = np.zeros((n,), bool)
    for j, rec in enumerate(records):
      if rec is None:
        continue
      t = transform_pair(rec, image_size=s, modality=self.modality,
                         modalities=self.modalities, rng=rng,
                         crop_scale=self.crop_scale)
      for k in self.modalities:
        out[k][j] = t[k]
      out["label"][j], out["index"][j] = t["label"], t["index"]
      out["mask"][j] = True
      if "pseudo_label" in rec:
        out.setdefault("pseudo_label", np.full((n,), -1, np.int32))
        out["pseudo_label"][j] = rec["pseudo_label"]
    return out
