"""EuroSAT RGB + SWIR pairs from TFDS `eurosat/all`, paper class split.

`eurosat/all` stores the 13 Sentinel-2 L1C bands of each 64 x 64 tile as
float32 digital numbers (reflectance x 10000), in the order of the
all-bands GeoTIFFs: B01, B02, B03, B04, B05, B06, B07, B08, B09, B10, B11,
B12, B8A (B8A last, not after B08). One example gives both images of a
pair:

- RGB = bands B4, B3, B2 (indices 3, 2, 1), value / 3000 clipped to [0, 1]
  then stored as uint8. Land-surface reflectance in the visible bands rarely
  exceeds 0.3, so 3000 maps the useful range to the full 8 bits (the usual
  Sentinel-2 true-colour stretch).
- SWIR = band B12 (index 11; index 12 is B8A, near infrared), kept raw;
  the pipeline applies the paper's value / 4095 clipped to [0, 1]
  (transforms.other_to_unit). The reference reads it as rasterio band 12
  (1-based) of the same files.

Splits (EdgeVL protocol, classes disjoint between train and test, drawn
by the reference's numpy recipe, `info.reference_class_split`): 'train'
and 'validation' hold only `info.train_class_ids` {1, 2, 4, 8, 9}, 'test'
only `info.test_class_ids` {0, 3, 5, 6, 7}. Validation is a seeded 10 % of
the train-class tiles, so model selection never sees a test tile or a test
class (the reference selects on its test split). Labels keep their
original 0-9 ids, so evaluation prompts cover all 10 classes.

TFDS ships a single 'train' split of 27,000 tiles; the class of every tile
is read once and cached as a .npy file next to the data.
"""
import os

import numpy as np

from edgevl_jax.data import info as info_lib
from edgevl_jax.data import records
from edgevl_jax.utils import io as io_lib

TFDS_NAME = "eurosat/all"
BAND_NAMES = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09",
              "B10", "B11", "B12", "B8A")
NUM_BANDS = len(BAND_NAMES)
RGB_BANDS = tuple(BAND_NAMES.index(b) for b in ("B04", "B03", "B02"))
SWIR_BAND = BAND_NAMES.index("B12")
RGB_SCALE = 3000.0
VALIDATION_FRACTION = 0.1
SPLITS = ("train", "validation", "test")


def _convert(raw, index: int):
  bands = np.asarray(raw["sentinel2"])
  if bands.ndim != 3 or bands.shape[-1] != NUM_BANDS:
    raise ValueError(
        f"eurosat example {index}: expected 'sentinel2' of shape (H, W, "
        f"{NUM_BANDS}) (TFDS config eurosat/all); got {bands.shape}. The "
        "'rgb' config has no SWIR band: prepare eurosat/all.")
  rgb = np.clip(bands[..., RGB_BANDS] / RGB_SCALE, 0.0, 1.0)
  return {"rgb": (rgb * 255.0 + 0.5).astype(np.uint8),
          "other": bands[..., SWIR_BAND].astype(np.float32),
          "label": int(raw["label"]), "index": index}


def _labels(raw, data_dir: str) -> np.ndarray:
  """Label of every raw record, cached under data_dir after the first read."""
  path = os.path.join(data_dir, f"eurosat_all_labels_{len(raw)}.npy")
  if os.path.exists(path):
    labels = np.load(path)
    if len(labels) == len(raw):
      return labels
  labels = np.asarray([int(raw[i]["label"]) for i in range(len(raw))],
                      np.int64)
  try:
    with io_lib.atomic_path(path) as tmp:
      np.save(tmp, labels)
  except OSError:
    pass  # A read-only data_dir only costs a re-read next time.
  return labels


def split_positions(labels: np.ndarray, split: str,
                    info: info_lib.DatasetInfo, seed: int = 0) -> np.ndarray:
  """Raw record positions of one split of the class-disjoint protocol."""
  if split not in SPLITS:
    raise ValueError(f"EuroSAT split {split!r} unknown; expected one of "
                     f"{SPLITS}.")
  if split == "test":
    return np.nonzero(np.isin(labels, info.test_class_ids))[0]
  train = np.nonzero(np.isin(labels, info.train_class_ids))[0]
  order = np.random.default_rng(seed).permutation(len(train))
  n_val = int(round(VALIDATION_FRACTION * len(train)))
  chosen = order[:n_val] if split == "validation" else order[n_val:]
  return np.sort(train[chosen])


def load_split(split: str, *, data_dir: str) -> records.PairedSource:
  """PairedSource of one EuroSAT split (module docstring), modality 'swir'."""
  info = info_lib.get_info("eurosat")
  if split not in SPLITS:
    raise ValueError(f"EuroSAT split {split!r} unknown; expected one of "
                     f"{SPLITS}.")
  raw = records.tfds_data_source(TFDS_NAME, "train", data_dir)
  positions = split_positions(_labels(raw, data_dir), split, info)
  return records.PairedSource(raw, _convert, info=info, split=split,
                              positions=positions)
