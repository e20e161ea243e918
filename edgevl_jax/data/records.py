"""The paired record every dataset yields, and the source that checks it.

Every dataset loader (`sources.load_split`) returns a PairedSource whose
records are

  {'rgb': uint8 (H, W, 3), 'other': (H, W) raw non-RGB values,
   'label': int, 'index': int (position in the split), ['caption': str]}

and which carries `.modality` ('depth' | 'swir'), `.info` (DatasetInfo) and
`.split`. How 'other' becomes a [0, 1] image is the pipeline's business
(transforms.other_to_unit). Sources are grain RandomAccessDataSources
(`__len__`, `__getitem__`), so grain samplers, sharding and checkpoints work.

This module is the bottom of the data package: dataset builders and loaders
import it, it imports none of them (sources.py, the name -> loader table,
sits on top).
"""
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from edgevl_jax.data import info as info_lib

Record = dict[str, Any]
# Splits whose decoded records fit in this many bytes are cached in memory.
CACHE_LIMIT_BYTES = 512 << 20


class PairedSource:
  """Wraps a raw random-access source and converts its records.

  Attributes:
    info: the dataset's DatasetInfo.
    split: split name.
    modality: non-RGB modality name.
  """

  def __init__(self, raw: Any, convert: Callable[[Record, int], Record], *,
               info: info_lib.DatasetInfo, split: str,
               positions: Sequence[int] | None = None,
               cache_limit_bytes: int = CACHE_LIMIT_BYTES):
    self._raw = raw
    self._convert = convert
    self._positions = None if positions is None else np.asarray(positions)
    # Decoded records of a split that fits in `cache_limit_bytes` are kept
    # in memory after their first read: TFDS decoding is most of a small
    # record's loading cost, and the demo re-reads each record many times.
    self._cache_limit = int(cache_limit_bytes)
    self._cache: dict[int, Record] | None = None
    self.info = info
    self.split = split
    self.modality = info.other_modality
    if len(self) == 0:
      raise ValueError(
          f"Split {split!r} of dataset {info.name!r} is empty; expected at "
          "least one example (check the split name and the prepared data).")

  def __len__(self) -> int:
    if self._positions is not None:
      return len(self._positions)
    return len(self._raw)

  def __getitem__(self, index: int) -> Record:
    index = int(index)
    if self._cache is not None and index in self._cache:
      return self._cache[index]
    raw_index = index if self._positions is None else int(
        self._positions[index])
    record = self._convert(self._raw[raw_index], index)
    check_record(record, where=f"{self.info.name}[{self.split}][{index}]")
    if self._cache is None and self._cache_limit > 0:
      # Decided on the first read: the whole split's decoded size.
      size = sum(np.asarray(v).nbytes for v in record.values()) * len(self)
      self._cache = {} if size <= self._cache_limit else None
      self._cache_limit = self._cache_limit if self._cache is not None else 0
    if self._cache is not None:
      self._cache[index] = record
    return record

  def __repr__(self) -> str:
    return (f"PairedSource({self.info.name!r}, split={self.split!r}, "
            f"len={len(self)}, modality={self.modality!r})")


def check_record(record: Record, *, where: str) -> None:
  """Validates one standard record; raises ValueError naming the problem."""
  for key in ("rgb", "other", "label"):
    if key not in record or record[key] is None:
      raise ValueError(f"{where}: missing modality/field {key!r}; a paired "
                       "record needs 'rgb', 'other' and 'label'.")
  rgb, other = np.asarray(record["rgb"]), np.asarray(record["other"])
  if rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"{where}: 'rgb' must be (H, W, 3); got shape "
                     f"{rgb.shape}.")
  if other.ndim == 3 and other.shape[-1] == 1:
    other = other[..., 0]
  if other.ndim != 2:
    raise ValueError(f"{where}: 'other' must be one channel (H, W) or "
                     f"(H, W, 1); got shape {other.shape}.")
  if other.shape != rgb.shape[:2]:
    raise ValueError(
        f"{where}: image sizes differ: rgb {rgb.shape[:2]} vs other "
        f"{other.shape}; paired images must be co-registered (same H, W).")


def decode_text(x: Any) -> str:
  """A TFDS text feature (bytes) or str as str."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def tfds_split(builder, split: str, name: str):
  """builder.as_data_source()[split] with a clear error for a bad split."""
  splits = builder.as_data_source()
  if split not in splits:
    raise ValueError(f"Dataset {name!r} has no split {split!r}; expected one "
                     f"of {sorted(splits)}.")
  return splits[split]


def tfds_data_source(name: str, split: str, data_dir: str):
  """`tfds.data_source` with the error turned into one that names the fix."""
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for a missing dataset.
    raise ValueError(
        f"Could not open TFDS dataset {name!r} split {split!r} under "
        f"data_dir={data_dir!r} ({type(e).__name__}: {e}). Prepare it first "
        "(e.g. `tfds build` with the 'prepare' extra installed) or point "
        "data_dir at a folder that holds it.") from e
